"""Typed training configuration: dataclass sections with defaults and help, loaded from YAML.

A config file is a YAML mapping whose top-level keys are :class:`TrainConfig` fields; sections
(``model``, ``lora``, ``data``, ``curriculum``, ``optim``, ``objective``, ``routing``,
``validation``) are nested mappings. Every key is checked: an unknown or mistyped key is a
:class:`~musar.errors.MusarError` naming it, never silently ignored. Command-line overrides use
dotted keys (``optim.lr=3e-4``) and go through the same checks.

Relative paths inside a config (data source, validation references, output_dir) are relative to
the current working directory, like every other path on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from musar.data.curriculum_config import CurriculumConfig
from musar.data.defaults import DEFAULT_PADDING, DEFAULT_QUALITY_THRESHOLD, SUBJECTS200K_HUB_ID
from musar.errors import MusarError
from musar.lora.config import BranchLoRAConfig
from musar.models.options import RoutingOptions
from musar.utils.safe_load import parse_yaml, read_yaml
from musar.utils.validation import (
    BATCH_SIZE,
    GUIDANCE,
    HEIGHT,
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_RANK,
    NUM_WORKERS,
    SEED,
    STEPS,
    TRAIN_SEED,
    WIDTH,
)

# SDPA kernels the training step may use on CUDA. docs/design.md sec. 9: SDPA's default choice for these
# shapes on H100 is cuDNN attention, whose *backward* failed; FlashAttention and the
# memory-efficient kernel worked, so training restricts SDPA to those two unless told otherwise.
AttentionKernel = Literal["flash_efficient", "flash", "efficient", "math", "cudnn", "default"]


@dataclass
class ModelConfig:
    pretrained: str = field(default="black-forest-labs/FLUX.1-dev", metadata={"help": "Hub id or local folder of FLUX.1 (diffusers layout)."})
    preset: str | None = field(default=None, metadata={"help": "A registered preset, e.g. 'tiny' (random toy FLUX built offline) or 'toy'; overrides pretrained."})
    dtype: Literal["bf16", "fp16", "fp32"] = field(default="bf16", metadata={"help": "Weights dtype of the frozen base transformer (tiny: always fp32)."})
    encoder_dtype: Literal["bf16", "fp16", "fp32"] = field(default="bf16", metadata={"help": "Weights dtype of the frozen VAE and text encoders (tiny: always fp32)."})
    lora_dtype: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "Dtype of the trainable LoRA weights (fp32 = AdamW on full-precision weights)."})
    mixed_precision: Literal["auto", "bf16", "no"] = field(default="auto", metadata={"help": "Autocast: 'auto' = bf16 on CUDA, none on CPU."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute block activations in the backward pass (memory for time)."})
    attention: AttentionKernel = field(default="flash_efficient", metadata={"help": "SDPA kernels allowed on CUDA during training (ignored on CPU); see docs/training.md."})
    device: Literal["auto", "cpu"] = field(default="auto", metadata={"help": "'auto': the GPU(s) accelerate finds, else CPU; 'cpu': CPU even when a GPU is visible."})
    cpu_threads: int | None = field(default=None, metadata={"help": "Intra-op CPU threads when training on CPU (None = torch's default)."})
    condition_timestep: float = field(default=0.0, metadata={"help": "t_cond used to modulate condition tokens (docs/design.md sec. 2)."})


@dataclass
class DataConfig:
    source: str | None = field(default=SUBJECTS200K_HUB_ID, metadata={"help": "Subjects200K hub id or local parquet file/folder (None: MUSAR-Gen only)."})
    padding: int = field(default=DEFAULT_PADDING, metadata={"help": "Padding around each view of a pair image, px (real data: 8; toy fixture: 1)."})
    quality_threshold: int = field(default=DEFAULT_QUALITY_THRESHOLD, metadata={"help": "Keep rows whose three quality scores are all >= this (paper: 5)."})
    collections: list[str] | None = field(default=None, metadata={"help": "Keep only these collections (None: all)."})
    limit: int | None = field(default=None, metadata={"help": "Read only the first N rows (streams hub data; for smoke runs)."})
    musar_gen: str | None = field(default=None, metadata={"help": "MUSAR-Gen hub id or parquet, mixed in with curriculum.musar_gen_ratio."})
    view_size: int = field(default=512, metadata={"help": "Target height and per-view width, px (diptychs are 2x wide)."})
    condition_size: int = field(default=512, metadata={"help": "Side of the square reference images, px (paper: 512)."})
    num_workers: int = field(default=4, metadata={"help": "DataLoader worker processes per rank."})
    max_sequence_length: int = field(default=512, metadata={"help": "T5 tokens of the main prompt (FLUX.1-dev: 512)."})
    phrase_tokens: int = field(default=32, metadata={"help": "T5 tokens per subject phrase (m')."})
    text_cache_size: int = field(default=0, metadata={"help": "Cache this many text embeddings in memory (0 = off; each prompt ~4 MB at FLUX size)."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder for hub sources."})


@dataclass
class OptimConfig:
    lr: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate (ours; the paper's is unreadable)."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW decoupled weight decay on the LoRA weights."})
    warmup_steps: int = field(default=500, metadata={"help": "Linear warmup, in optimizer updates."})
    schedule: Literal["constant", "cosine", "linear"] = field(default="constant", metadata={"help": "LR after warmup: constant, or cosine/linear decay to min_lr_ratio at max_steps."})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "Final LR as a fraction of lr for cosine/linear."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm (<= 0: no clipping, norm still logged)."})
    batch_size: int = field(default=1, metadata={"help": "Samples per batch per process."})
    grad_accumulation: int = field(default=1, metadata={"help": "Batches per optimizer step per process."})


@dataclass
class ObjectiveConfig:
    """Rectified flow as FLUX trains it (docs/design.md sec. 7); see musar.train.objective."""

    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal timestep density."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit-normal timestep density."})
    shift: bool = field(default=True, metadata={"help": "Apply FLUX's resolution-dependent timestep shift."})
    base_seq_len: int = field(default=256, metadata={"help": "Shift: token count where mu = base_shift."})
    max_seq_len: int = field(default=4096, metadata={"help": "Shift: token count where mu = max_shift."})
    base_shift: float = field(default=0.5, metadata={"help": "Shift mu at base_seq_len (FLUX scheduler config)."})
    max_shift: float = field(default=1.15, metadata={"help": "Shift mu at max_seq_len (FLUX scheduler config)."})
    guidance: float = field(default=1.0, metadata={"help": "Constant fed to FLUX.1-dev's guidance embedding while training (OminiControl's choice)."})


@dataclass
class ValidationPrompt:
    prompt: str = field(default="", metadata={"help": "Main prompt; contains every subject phrase."})
    subjects: list[tuple[str, str]] = field(default_factory=list, metadata={"help": "[[image path, phrase], ...]."})


@dataclass
class ValidationConfig:
    prompts: list[ValidationPrompt] = field(default_factory=list, metadata={"help": "Fixed prompts/subjects rendered into the grid."})
    height: int = field(default=1024, metadata={"help": "Generated image height."})
    width: int = field(default=1024, metadata={"help": "Generated image width."})
    steps: int = field(default=28, metadata={"help": "Denoising steps."})
    guidance: float = field(default=3.5, metadata={"help": "Guidance scale at inference."})
    seed: int = field(default=0, metadata={"help": "Seed of every validation image (same noise each time)."})


@dataclass
class TrainConfig:
    output_dir: str = field(default="outputs/train", metadata={"help": "Checkpoints, logs, validation grids and the final LoRA go here."})
    max_steps: int | None = field(default=None, metadata={"help": "Training steps (None = the curriculum's total)."})
    seed: int = field(default=0, metadata={"help": "Seed of data, noise and timesteps (per rank)."})
    checkpoint_every: int = field(default=1000, metadata={"help": "Save a checkpoint every N steps (0 = only at the end)."})
    keep_last: int = field(default=3, metadata={"help": "Keep the newest K checkpoints (0 = keep all)."})
    log_every: int = field(default=10, metadata={"help": "Write scalars every N steps."})
    validate_every: int = field(default=0, metadata={"help": "Render the validation grid every N steps (0 = never)."})
    max_nonfinite_in_a_row: int = field(default=10, metadata={"help": "Stop after this many non-finite losses in a row."})
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": "Trackers: tensorboard, wandb (optional), none."})
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: BranchLoRAConfig = field(default_factory=BranchLoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # Training routes with the grouped-SDPA backend ("fast"): its forward and backward run on the
    # SDPA kernels chosen by model.attention, the combination docs/design.md sec. 9 saw work on H100.
    routing: RoutingOptions = field(default_factory=lambda: RoutingOptions(backend="fast"))
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.curriculum.total_steps

    def check(self) -> TrainConfig:
        """Cross-field checks a dataclass field cannot express; returns self."""
        positive = {"optim.batch_size": self.optim.batch_size, "optim.grad_accumulation": self.optim.grad_accumulation,
                    "max_nonfinite_in_a_row": self.max_nonfinite_in_a_row, "log_every": self.log_every}
        for key, value in positive.items():
            if value < 1:
                raise MusarError(f"config {key} must be >= 1, got {value}")
        for key, value in {"checkpoint_every": self.checkpoint_every, "keep_last": self.keep_last,
                           "validate_every": self.validate_every, "optim.warmup_steps": self.optim.warmup_steps}.items():
            if value < 0:
                raise MusarError(f"config {key} must be >= 0, got {value}")
        if self.total_steps < 1:
            raise MusarError(f"config max_steps must be >= 1, got {self.total_steps}")
        # Upper bounds on what sizes memory and processes: a typo (batch_size: 10000) fails here,
        # not as an out-of-memory kill an hour into data loading. The rules say where each comes from.
        for key, rule, number in (("optim.batch_size", BATCH_SIZE, self.optim.batch_size),
                                  ("data.num_workers", NUM_WORKERS, self.data.num_workers),
                                  ("lora.noise_rank", LORA_RANK, self.lora.noise_rank),
                                  ("lora.subject_rank", LORA_RANK, self.lora.subject_rank),
                                  ("lora.dropout", LORA_DROPOUT, self.lora.dropout)):
            rule.check(number, f"config {key}")
        for key, alpha in (("lora.noise_alpha", self.lora.noise_alpha), ("lora.subject_alpha", self.lora.subject_alpha)):
            if alpha is not None:
                LORA_ALPHA.check(alpha, f"config {key}")
        if self.optim.lr <= 0:
            raise MusarError(f"config optim.lr must be > 0, got {self.optim.lr}")
        if not 0 <= self.optim.min_lr_ratio <= 1:  # outside: a negative lr, or a "decay" that climbs
            raise MusarError(f"config optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}")
        for key, size in {"data.view_size": self.data.view_size, "data.condition_size": self.data.condition_size}.items():
            if size < 16 or size % 16:
                raise MusarError(f"config {key} must be a positive multiple of 16, got {size}")
        v = self.validation
        for key, rule, number in (("seed", TRAIN_SEED, self.seed), ("validation.seed", SEED, v.seed),
                                  ("validation.steps", STEPS, v.steps), ("validation.guidance", GUIDANCE, v.guidance),
                                  ("validation.height", HEIGHT, v.height), ("validation.width", WIDTH, v.width)):
            rule.check(number, f"config {key}")
        if self.data.source is None and self.data.musar_gen is None:
            raise MusarError("config data.source and data.musar_gen are both empty: nothing to train on")
        if self.model.preset is not None:
            from musar.utils.registry import check_preset

            try:
                check_preset(self.model.preset)
            except MusarError as e:
                raise MusarError(f"config model.preset: {e}") from None
        unknown = set(self.report_to) - {"tensorboard", "wandb", "none"}
        if unknown:
            raise MusarError(f"config report_to: unknown tracker(s) {sorted(unknown)}; expected tensorboard, wandb or none")
        return self


# -- YAML <-> dataclasses ----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` or a MusarError naming ``key``; nested dataclasses recurse."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except MusarError as e:
                errors.append(str(e))
        raise MusarError(errors[0] if len(errors) == 1 else f"config key {key!r}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise MusarError(f"config key {key!r}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise MusarError(f"config key {key!r}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise MusarError(f"config key {key!r}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MusarError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is float and not isinstance(value, bool):
        number = value
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, (int, float)):
            if not math.isfinite(number):  # .nan / .inf would train or render garbage silently
                raise MusarError(f"config key {key!r}: expected a finite number, got {value!r}")
            return float(number)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, Path)):
        return str(value)
    raise MusarError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: Any, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types.

    Keys not in the mapping keep ``base``'s values (default: the class defaults).
    """
    where = f"section {prefix!r}" if prefix else "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MusarError(f"config {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise MusarError(f"unknown config key {key!r}; {where} accepts: {', '.join(names)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key, factory = f"{prefix}.{k}" if prefix else k, fields[k].default_factory
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and factory is not dataclasses.MISSING:
            # A partial section keeps the field's own defaults, which may differ from its class's
            # (training routes with backend "fast", RoutingOptions defaults to "auto").
            kwargs[k] = from_dict(hints[k], v, key, base=factory())
        else:
            kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, MusarError):
            raise
        raise MusarError(f"config {where}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-able dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``"section.key=value"`` (value parsed as YAML) to a raw config mapping."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise MusarError(f"override {assignment!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise MusarError(f"override {assignment!r}: {part!r} is not a section")
    # parse_yaml bounds the value like a config file: an alias bomb typed on the command line
    # is as hostile as one in a file.
    node[parts[-1]] = parse_yaml(raw, f"override {assignment[:80]!r}") if raw.strip() else None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults for ``None``), apply ``key=value`` overrides, check it."""
    data: Any = {}
    if path is not None:
        data = read_yaml(path, "config file")
        data = {} if data is None else data  # an empty file is the defaults
        path = Path(path)
        if not isinstance(data, dict):
            raise MusarError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return from_dict(TrainConfig, data).check()
    except MusarError as e:
        raise MusarError(f"{path}: {e}" if path is not None else str(e)) from None


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
