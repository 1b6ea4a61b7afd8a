"""Saving and loading branch-LoRA weights: safetensors only, adapter weights only.

Key names are stable and readable: ``<module path>.lora_{A,B}.{noise,subject}.weight`` (or
``.shared.`` for the single-LoRA ablation). Ranks, alphas, mode and targets travel in the
safetensors header metadata, so a file is self-describing. Loading refuses anything that is not
a safetensors file (pickles included) and any key or shape that does not fit the model, with a
:class:`~musar.errors.MusarError` naming the problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from musar.errors import MusarError
from musar.lora import BranchLoRAConfig, inject_branch_lora, lora_named_parameters, remove_branch_lora
from musar.utils.io import atomic_path
from musar.utils.validation import LORA_FORMAT as FORMAT  # the header's "format", checked without torch there

FORMAT_VERSION = "1"


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in lora_named_parameters(model)}


def save_branch_lora(
    model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    config: BranchLoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("model has no branch LoRA to save")
    return save_lora_tensors(config, lora_state_dict(model), path, metadata)


def save_lora_tensors(
    config: BranchLoRAConfig,
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """A LoRA file from its config and its ``<module path>.lora_{A,B}.<branch>.weight`` tensors
    (a model's, or the full tensors gathered from FSDP shards), atomically."""
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_config": json.dumps(dataclasses.asdict(config)),
        **(metadata or {}),
    }
    state = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)
    return Path(path)


def _open(path: str | os.PathLike[str]):
    path = Path(path)
    if not path.is_file():
        raise MusarError(f"LoRA file not found: {path}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises several types for a bad header
        raise MusarError(f"{path} is not a safetensors file ({type(e).__name__}); LoRA weights load from safetensors only") from None


def is_branch_lora_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file whose header says it is a MUSAR branch LoRA."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not a safetensors file, unreadable: not ours
        return False


def read_lora_config(path: str | os.PathLike[str]) -> BranchLoRAConfig:
    with _open(path) as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise MusarError(f"{path} is a safetensors file but not a MUSAR branch LoRA (header format {meta.get('format')!r})")
    try:
        raw = json.loads(meta["lora_config"])
        return BranchLoRAConfig(**raw)
    except (KeyError, TypeError, ValueError) as e:
        raise MusarError(f"{path} has an unreadable LoRA config in its header: {e}") from None


def load_branch_lora(model: nn.Module, path: str | os.PathLike[str]) -> BranchLoRAConfig:
    """Load a LoRA file into ``model``, injecting the branches the file describes if needed."""
    config = read_lora_config(path)
    current = getattr(model, "lora_config", None)
    if current is None:
        try:
            inject_branch_lora(model, config)
        except ValueError as e:
            raise MusarError(f"LoRA file {path} does not match the model: {e}") from None
        try:
            _copy_weights(model, path)
        except MusarError:
            remove_branch_lora(model)  # leave the model as we found it
            raise
    elif current != config:
        raise MusarError(f"LoRA file {path} was saved with {config}, but the model carries {current}")
    else:
        _copy_weights(model, path)
    return config


def _copy_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    params = dict(lora_named_parameters(model))
    with _open(path) as f:
        keys = set(f.keys())
        unknown = sorted(keys - params.keys())
        missing = sorted(params.keys() - keys)
        if unknown:
            raise MusarError(f"LoRA file {path} does not match the model: {len(unknown)} unknown keys, e.g. {unknown[0]!r}")
        if missing:
            raise MusarError(f"LoRA file {path} does not match the model: {len(missing)} keys missing, e.g. {missing[0]!r}")
        with torch.no_grad():
            for name in sorted(keys):
                tensor = f.get_tensor(name)
                p = params[name]
                if tensor.shape != p.shape:
                    raise MusarError(
                        f"LoRA file {path} does not match the model: {name} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(p.shape)}"
                    )
                p.copy_(tensor.to(p.dtype))
