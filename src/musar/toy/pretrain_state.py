"""Checkpoints of the toy base's pretraining: a stopped ``musar toy pretrain`` resumes where it stopped.

The base trains in one loop (about 50 minutes on 2 cores) after the codec and the T5's masked-word
phase. Before the loop's first step, every ``checkpoint_every`` steps after it, and when SIGINT /
SIGTERM arrive, :func:`save` writes ``<out>/pretrain_state/checkpoints/step-NNNNNN/``: every
weight of the pipeline, the optimizer, the LR schedule, the EMA, the loop's generator and torch's
global RNG, the loss history and the wall so far. The next pretraining into the same ``out`` with
the same recipe continues from the newest one bit-exactly (tests/test_toy_pretrain_resume.py); a
changed recipe refuses to resume and names what changed. Folders are staged, sealed with a
manifest and renamed (:mod:`musar.train.checkpoint`), so a kill mid-write leaves the previous
checkpoint whole; once the base is saved they are deleted.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model, save_file, save_model

from musar.errors import MusarError
from musar.train import checkpoint as ckpt
from musar.train.fingerprint import differences, flatten
from musar.train.state import load_rng, save_rng

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from musar.pipelines.pipeline_musar import MusarPipeline
    from musar.toy.pretrain import PretrainConfig

STATE_DIR = "pretrain_state"
FORMAT = 1
MODULES = ("transformer", "text_encoder", "text_encoder_2")  # the codec is saved with its config (below)
# Settings that change neither the weights nor the data order: free to differ on resume.
FREE_KEYS = ("threads", "log_every", "checkpoint_every")


@dataclass
class LoopState:
    """What the loop carries from step to step besides the models and optimizer."""

    step: int = 0
    wall_s: float = 0.0  # summed over the calls that trained, as pretrain.json reports it
    history: list[dict[str, float]] = field(default_factory=list)
    window: dict[str, list[float]] = field(default_factory=lambda: {"flow": [], "grounding": []})
    probes: list[dict[str, object]] = field(default_factory=list)
    codec_info: dict[str, object] = field(default_factory=dict)
    text_info: dict[str, object] = field(default_factory=dict)


def state_dir(out: str | Path) -> Path:
    return Path(out) / STATE_DIR


def recipe(cfg: PretrainConfig) -> dict[str, Any]:
    """The flattened recipe as JSON stores it, less :data:`FREE_KEYS`."""
    import json

    flat = {k: v for k, v in flatten(asdict(cfg)).items() if k not in FREE_KEYS}
    return json.loads(json.dumps(flat, default=str))


def clear(out: str | Path) -> None:
    """Delete every checkpoint (a finished or a restarted pretraining)."""
    shutil.rmtree(ckpt.checkpoints_root(state_dir(out)), ignore_errors=True)


def find(out: str | Path, cfg: PretrainConfig) -> Path | None:
    """The newest checkpoint to resume from, checked whole and against ``cfg``; None if none."""
    found = ckpt.list_checkpoints(state_dir(out))
    if not found:
        return None
    path = found[-1][1]
    ckpt.check_manifest(path)
    raw = ckpt.read_json(path / ckpt.TRAINER_FILE)
    if raw.get("format") != FORMAT:
        raise MusarError(f"toy pretrain: checkpoint {path} has format {raw.get('format')!r}; this version reads {FORMAT}")
    changed = differences(raw.get("recipe", {}), recipe(cfg))
    if changed:
        raise MusarError(f"toy pretrain: cannot resume {path}: the recipe changed ({'; '.join(changed)}); "
                         "pass --force to start over")
    return path


def save(
    out: str | Path, cfg: PretrainConfig, pipe: MusarPipeline, opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler, ema: EMAModel | None, gen: torch.Generator, loop: LoopState,
) -> Path:
    """Write the checkpoint of ``loop.step`` atomically and delete the older ones."""
    root = state_dir(out)
    staging = ckpt.staging_dir(root, loop.step)
    final = ckpt.checkpoints_root(root) / ckpt.checkpoint_name(loop.step)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in MODULES:  # save_model keeps tied weights (the T5's embeddings) tied
        save_model(getattr(pipe, name), str(staging / f"{name}.safetensors"))
    pipe.vae.save_pretrained(staging / "vae")  # its config holds the latent scale the codec phase measured
    ckpt.write_optimizer_state(opt.state_dict(), staging)
    ckpt.write_json(staging / "scheduler.json", sched.state_dict())
    tensors = {"generator": gen.get_state()}
    ema_meta = None
    if ema is not None:
        ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        tensors.update({f"ema.{i}": p.detach().clone() for i, p in enumerate(ema.shadow_params)})
    save_file(tensors, str(staging / "loop.safetensors"))
    save_rng(staging, 0)
    ckpt.write_json(staging / ckpt.TRAINER_FILE, {"format": FORMAT, "recipe": recipe(cfg), "ema": ema_meta,
                                                  **asdict(loop)})
    ckpt.commit(staging, final)
    ckpt.prune(root, 1)
    return final


def load_models(path: Path, pipe: MusarPipeline) -> None:
    """The pipeline's weights as the checkpoint saved them (in place: optimizers keep their params)."""
    from musar.toy.codec import ToyCodec

    for name in MODULES:
        load_model(getattr(pipe, name), str(path / f"{name}.safetensors"))
    pipe.vae = ToyCodec.from_pretrained(path / "vae")


def restore(
    path: Path, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, ema: EMAModel | None,
    gen: torch.Generator,
) -> LoopState:
    """Optimizer, schedule, EMA and both random states (call last, just before the loop)."""
    raw = ckpt.read_json(path / ckpt.TRAINER_FILE)
    opt.load_state_dict(ckpt.read_optimizer_state(path))
    sched.load_state_dict(ckpt.read_json(path / "scheduler.json"))
    tensors = ckpt.load_tensors(path / "loop.safetensors")
    gen.set_state(tensors["generator"])
    if (ema is None) != (raw.get("ema") is None):
        raise MusarError(f"toy pretrain: checkpoint {path} and the recipe disagree on the EMA")
    if ema is not None:
        shadow = [tensors[f"ema.{i}"] for i in range(len(ema.shadow_params))]
        ema.load_state_dict({**raw["ema"], "shadow_params": shadow})
    load_rng(path, 0)
    keys = set(LoopState.__dataclass_fields__)
    return LoopState(**{k: v for k, v in raw.items() if k in keys})
