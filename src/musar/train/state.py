"""A run's training state on disk: what a checkpoint folder holds beyond the files it is made of.

:mod:`musar.train.checkpoint` owns the folder (atomic staging, manifest, validation, pruning) and
the pickle-free formats; this module decides what goes into it for a built run (LoRA, optimizer,
scheduler, RNG states, data position, counters, the run's config) and puts it back, so that a
resumed run continues bit-exactly.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from musar.errors import MusarError
from musar.train import checkpoint as ckpt
from musar.train.config import TrainConfig
from musar.train.distributed import load_optimizer, save_lora, save_optimizer
from musar.train.fingerprint import RUN_CONFIG, RUN_FINGERPRINT, fingerprint, run_config
from musar.train.setup import Components

# trainer.json's "format": bumped when older checkpoints could no longer be restored exactly.
CHECKPOINT_FORMAT = 1


def save_training_state(c: Components, cfg: TrainConfig, state: dict[str, Any], output_dir: Path, step: int) -> Path:
    """Write a complete checkpoint folder for ``step`` (collective: call on every process)."""
    acc = c.accelerator
    staging, final = ckpt.staging_dir(output_dir, step), ckpt.checkpoints_root(output_dir) / ckpt.checkpoint_name(step)
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    acc.wait_for_everyone()
    save_lora(acc, c.model, c.transformer, staging / "lora.safetensors", {"step": str(step)})
    save_optimizer(acc, c.model, c.optimizer, staging)
    save_rng(staging, acc.process_index)
    if acc.is_main_process:
        ckpt.write_json(staging / "scheduler.json", c.scheduler.state_dict())
        c.stream.position = step * cfg.optim.grad_accumulation
        config = run_config(cfg)
        ckpt.write_json(staging / ckpt.TRAINER_FILE, {
            **state, "format": CHECKPOINT_FORMAT, "data": c.stream.state_dict(), "world_size": acc.num_processes,
            "total_steps": cfg.total_steps, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            RUN_CONFIG: config, RUN_FINGERPRINT: fingerprint(config),
        })
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.commit(staging, final)
        ckpt.prune(output_dir, cfg.keep_last)
    acc.wait_for_everyone()
    return final


def load_training_state(c: Components, cfg: TrainConfig, directory: Path) -> dict[str, Any]:
    """Restore optimizer, scheduler, RNG and data position (the LoRA was loaded at build time)."""
    acc = c.accelerator
    raw = ckpt.read_json(directory / ckpt.TRAINER_FILE)
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise MusarError(f"checkpoint {directory} has format {raw.get('format')!r}; this version reads {CHECKPOINT_FORMAT}")
    load_optimizer(acc, c.model, c.optimizer, directory)
    c.scheduler.load_state_dict(ckpt.read_json(directory / "scheduler.json"))
    if raw.get("world_size") != acc.num_processes:
        import warnings

        warnings.warn(f"checkpoint was written by {raw.get('world_size')} processes, resuming with {acc.num_processes}: "
                      "the data order will differ from an uninterrupted run", stacklevel=2)
    elif not load_rng(directory, acc.process_index):
        raise MusarError(f"checkpoint {directory} has no RNG state for rank {acc.process_index}")
    c.stream.load_state_dict(raw["data"])
    if raw["data"]["position"] != raw["step"] * cfg.optim.grad_accumulation:
        raise MusarError(f"checkpoint {directory}: data position {raw['data']['position']} does not match step "
                         f"{raw['step']} x grad_accumulation {cfg.optim.grad_accumulation}")
    return raw


def save_rng(directory: Path, rank: int) -> None:
    """Python, numpy, torch CPU and CUDA generator states of this process."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    ckpt.write_json(directory / f"rng_rank{rank}.json", {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    })
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    save_file(tensors, str(directory / f"rng_rank{rank}.safetensors"))


def load_rng(directory: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for this rank."""
    meta_path, tensor_path = directory / f"rng_rank{rank}.json", directory / f"rng_rank{rank}.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        return False
    meta = ckpt.read_json(meta_path)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = ckpt.load_tensors(tensor_path)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return True
