"""What a model is, known before it loads: its configs, its token size, its tokenizer (issue 22).

The checks that depend on the model (a subject phrase the tokenizer truncates, a LoRA made for
another width, a GGUF file of another model, a run that cannot fit in memory, a layout box
smaller than one token) need a few numbers and the T5 tokenizer, never the weights.
:func:`model_facts` finds them without loading any weight:

* a local folder: ``model_index.json`` and each component's ``config.json``, audited first by
  :func:`musar.pipelines.model_folder.check_model_folder`; the tokenizer from ``tokenizer_2/``,
  local files only, with the class the index names (no remote code);
* a hub id: the same files where the local cache has them, else (FLUX.1-dev, the default)
  FLUX.1-dev's published sizes; the tokenizer alone is downloaded (a few MB, before the 30 GB);
* a preset: the folder it declares (``model_folder``, as the toy one's shipped base would), else
  the preset built on the CPU: presets are small by design (tiny builds in milliseconds).

Nothing here changes a file, and a folder that would fail to load fails its check the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from musar.errors import MusarError, hub_failure
from musar.utils.memory import ModelSize, vae_params
from musar.utils.safe_load import read_json, shown
from musar.utils.spans import find_phrase_chars, find_subject_spans

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"  # musar.pipelines.pipeline_musar's (a test keeps them equal)
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
# FLUX.1-dev's published component sizes, for the default model before any of it is downloaded.
FLUX1_DEV: dict[str, dict[str, Any]] = {
    "transformer": {"attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
                    "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
                    "pooled_projection_dim": 768},
    "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16},
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "vocab_size": 49408,
                     "max_position_embeddings": 77},
    "text_encoder_2": {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128},
}


@dataclass
class ModelFacts:
    """A model as far as it is known without its weights. ``configs`` may lack components (a hub
    id whose files are not cached): the checks that need one then skip, and loading judges."""

    name: str  # how messages name the model: "model folder /m", "preset toy", "org/name"
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    folder: Path | None = None
    hub: str | None = None
    pipeline: Any = None  # a built preset (one that names no folder)
    preset: str | None = None  # presets keep their own dtype (fp32)
    _tokenizer: Any = None

    @classmethod
    def of_pipeline(cls, pipe: Any, name: str, preset: str | None = None) -> ModelFacts:
        """The facts of a built pipeline (a preset, or the UI's loaded model), from its components' configs."""
        configs = {n: dict(getattr(pipe, n).config) for n in ("transformer", "vae") if getattr(pipe, n, None) is not None}
        return cls(name, configs, pipeline=pipe, preset=preset)

    @property
    def transformer(self) -> dict[str, Any] | None:
        return self.configs.get("transformer")

    @property
    def vae_scale_factor(self) -> int:
        """diffusers' FluxPipeline rule: 2 ** (VAE levels - 1), 8 without a VAE config."""
        if self.pipeline is not None:
            return int(self.pipeline.vae_scale_factor)
        channels = (self.configs.get("vae") or {}).get("block_out_channels")
        return 2 ** (len(channels) - 1) if isinstance(channels, (list, tuple)) and channels else 8

    @property
    def token_px(self) -> int:
        """Pixels per side of one image token: the VAE factor x FLUX's 2x2 packing x the patch size."""
        patch = (self.transformer or {}).get("patch_size") or 1
        return 2 * self.vae_scale_factor * int(patch)

    def size(self) -> ModelSize | None:
        """What the memory estimate needs; None without a transformer config."""
        from musar.lora.fit import transformer_width
        from musar.pipelines.model_folder import flux_transformer_params, text_encoder_params

        config = self.transformer
        if config is None:
            return None
        vae = self.configs.get("vae") or {}
        if self.pipeline is not None:  # a built preset: count exactly
            count = {n: sum(p.numel() for p in getattr(self.pipeline, n).parameters()) for n in COMPONENTS}
        else:
            count = {"transformer": flux_transformer_params(config), "vae": vae_params(vae),
                     **{n: text_encoder_params(self.configs.get(n) or {}) for n in ("text_encoder", "text_encoder_2")}}
        channels = vae.get("block_out_channels")
        return ModelSize(
            width=transformer_width(config),
            blocks=int(config.get("num_layers", 19) or 0) + int(config.get("num_single_layers", 38) or 0),
            token_px=self.token_px,
            transformer_params=count["transformer"],
            t5_params=count["text_encoder_2"],
            other_params=count["text_encoder"] + count["vae"],
            vae_channels=int(channels[0]) if isinstance(channels, (list, tuple)) and channels and isinstance(channels[0], int)
            else 128,
        )

    def tokenizer(self) -> Any:
        """The T5 tokenizer the pipeline encodes the prompt with (``tokenizer_2``), loaded alone."""
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def _load_tokenizer(self) -> Any:
        if self.pipeline is not None:
            return self.pipeline.tokenizer_2
        try:
            if self.folder is not None:
                tok = _folder_tokenizer(self.folder)
            elif self.hub is not None:
                from transformers import AutoTokenizer

                from musar.pipelines.model_folder import check_hub_model

                check_hub_model(self.hub)  # one quick request, not transformers' retries, when the hub is away
                repo, _, revision = self.hub.partition("@")
                tok = AutoTokenizer.from_pretrained(repo, subfolder="tokenizer_2", revision=revision or None,
                                                    trust_remote_code=False)
            else:
                return None
        except MusarError:
            raise
        except Exception as e:  # a damaged tokenizer file raises anything (tokenizers' Rust errors are Exception)
            if hub_failure(e) is not None:
                raise  # gated, unknown, offline: the error boundary words those
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise MusarError(f"cannot load the T5 tokenizer (tokenizer_2) of {self.name}: {first}") from None
        if not getattr(tok, "is_fast", False):
            raise MusarError(f"the T5 tokenizer (tokenizer_2) of {self.name} is not a fast tokenizer; subject spans "
                             "need its character offsets (add its tokenizer.json)")
        return tok


def _folder_tokenizer(folder: Path) -> Any:
    """``tokenizer_2/`` with the class ``model_index.json`` names, as the pipeline loads it."""
    import transformers

    entry = read_json(folder / "model_index.json", "model index", expect=dict).get("tokenizer_2")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" else None
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        cls = transformers.AutoTokenizer
    sub = folder / "tokenizer_2"
    if not sub.is_dir():
        raise MusarError(f"model folder {shown(folder)} has no tokenizer_2/ folder")
    return cls.from_pretrained(str(sub), local_files_only=True, trust_remote_code=False)


def _folder_facts(folder: Path, name: str) -> ModelFacts:
    from musar.pipelines.model_folder import CONFIG_NAMES, check_model_folder

    check_model_folder(folder, resolve_classes=False)  # index and every size checked, nothing imported
    configs = {}
    for component in COMPONENTS:
        path = folder / component / CONFIG_NAMES.get(component, "config.json")
        if path.is_file():
            configs[component] = read_json(path, f"{component} config", expect=dict)
    return ModelFacts(name, configs, folder=folder)


def _hub_facts(spec: str) -> ModelFacts:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = spec.partition("@")
    configs: dict[str, dict[str, Any]] = {}
    for component in COMPONENTS:
        try:
            cached = try_to_load_from_cache(repo, f"{component}/config.json", revision=revision or None)
        except ValueError:  # not a repo id; the caller's id check words that
            cached = None
        if isinstance(cached, str):
            configs[component] = read_json(cached, f"{component} config", expect=dict)
    if "transformer" not in configs and repo == DEFAULT_MODEL:
        configs = {k: dict(v) for k, v in FLUX1_DEV.items()}
    return ModelFacts(spec, configs, hub=spec)


def _preset_facts(preset: str) -> ModelFacts:
    from musar.utils.registry import get_preset

    spec = get_preset(preset)
    folder = getattr(spec, "model_folder", None)
    if folder is not None:
        facts = _folder_facts(Path(folder), f"preset {preset}")
        facts.preset = preset
        return facts
    return ModelFacts.of_pipeline(spec.build(False), f"preset {preset}", preset)  # small by design; no LoRA


def model_facts(model: str | os.PathLike[str] | None = None, preset: str | None = None) -> ModelFacts:
    """The facts of ``--model`` / ``--preset`` (neither: FLUX.1-dev), without loading a weight."""
    if preset is not None:
        return _preset_facts(preset)
    spec = str(model) if model is not None else DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_facts(path, f"model folder {shown(path)}")
    return _hub_facts(spec)


def declared_token_px(model: str | os.PathLike[str] | None = None, preset: str | None = None) -> int:
    """The model's token size as cheaply as it can be known, for the argument checks (no torch):
    a folder's or a cached hub model's configs; FLUX's 16 px for the core's own presets, which are
    FLUX-shaped (``tests/test_preload_checks.py`` builds each to keep it so); a plugin preset's facts."""
    from musar.models.boxes import FLUX_TOKEN_PX
    from musar.utils.registry import BUILTIN_PRESETS

    if preset is not None and preset in BUILTIN_PRESETS:
        return FLUX_TOKEN_PX
    return model_facts(model, preset).token_px


def _spans(tokenizer: Any, prompt: str, phrases: Sequence[str], max_length: int, cure: str) -> None:
    try:
        find_subject_spans(prompt, phrases, tokenizer, max_length)
    except MusarError as e:
        if "falls beyond" not in str(e):
            raise
        # The pipeline's line names character offsets; name the phrase and the prompt's length.
        chars = find_phrase_chars(prompt, phrases)
        kept = tokenizer(prompt, max_length=max_length, truncation=True, return_offsets_mapping=True)["offset_mapping"]
        # A max_length above any possible count: untruncated, without transformers' "longer than" warning.
        total = len(tokenizer(prompt, max_length=len(prompt) + 16, truncation=True)["input_ids"])
        late = next((p for p, (s, e) in zip(phrases, chars, strict=True)
                     if not any(te > ts and ts < e and te > s for ts, te in kept)), phrases[-1])
        raise MusarError(f"subject phrase {late!r} falls beyond the first {max_length} prompt tokens, where the "
                         f"prompt is cut (it has {total} tokens); {cure}") from None


def check_spans(facts: ModelFacts, prompt: str, phrases: Sequence[str], max_length: int,
                cure: str = "shorten the prompt or raise --max-sequence-length") -> None:
    """The pipeline's own span check (whole words, no overlap, none past ``max_length`` tokens) with
    the model's tokenizer, before the model loads."""
    tokenizer = facts.tokenizer()
    if tokenizer is not None:
        _spans(tokenizer, prompt, phrases, max_length, cure)


def check_case_spans(facts: ModelFacts, cases: Iterable[Any], max_length: int,
                     cure: str = "shorten the case's prompt") -> None:
    """:func:`check_spans` for every evaluation case; the error names the case."""
    tokenizer = facts.tokenizer()
    if tokenizer is None:
        return
    for case in cases:
        try:
            _spans(tokenizer, case.prompt, [s.phrase for s in case.subjects], max_length, cure)
        except MusarError as e:
            raise MusarError(f"case {case.case_id}: {e}") from None
