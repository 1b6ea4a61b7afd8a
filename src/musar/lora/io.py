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
from musar.utils.safe_load import parse_json
from musar.utils.tensorfile import read_header
from musar.utils.validation import LORA_FORMAT as FORMAT  # the header's "format", checked without torch there
from musar.utils.validation import check_lora_file

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


# A trained LoRA weight is O(1) (init ~1/sqrt(in), B starts at 0); 1e4 is far past any real one
# and far below where bf16 or the base activations overflow, so a larger value is a broken file.
MAX_ABS_WEIGHT = 1e4


def _open(path: str | os.PathLike[str]):
    """A safetensors handle on a LoRA file whose header was checked (structure, dtypes, offsets,
    config) before safetensors sees it."""
    path = check_lora_file(path)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises several types for a bad header
        raise MusarError(f"{path} is not a safetensors file ({type(e).__name__}); LoRA weights load from safetensors only") from None


def is_branch_lora_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file whose header says it is a MUSAR branch LoRA."""
    try:
        read_header(path)
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not a safetensors file, unreadable: not ours
        return False


def read_lora_config(path: str | os.PathLike[str]) -> BranchLoRAConfig:
    path = check_lora_file(path)  # format, and the config's types and bounds, from the header alone
    meta = read_header(path, "LoRA file").metadata
    try:
        raw = parse_json(meta["lora_config"], f"the LoRA config in {path}", expect=dict)
        return BranchLoRAConfig(**raw)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, MusarError):
            raise
        raise MusarError(f"{path} has an unreadable LoRA config in its header: {e}") from None


def _check_values(tensor: torch.Tensor, name: str, path: str | os.PathLike[str]) -> None:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    values = tensor.detach().float()
    if not bool(torch.isfinite(values).all()):
        raise MusarError(f"LoRA file {path}: tensor {name} holds NaN or infinite values")
    peak = float(values.abs().max())
    if peak > MAX_ABS_WEIGHT:
        raise MusarError(f"LoRA file {path}: tensor {name} holds a value of magnitude {peak:.3g}, "
                         f"above {MAX_ABS_WEIGHT:g}; the file is damaged")


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
    header = read_header(path, "LoRA file")
    with _open(path) as f:
        keys = set(f.keys())
        unknown = sorted(keys - params.keys())
        missing = sorted(params.keys() - keys)
        if unknown:
            raise MusarError(f"LoRA file {path} does not match the model: {len(unknown)} unknown keys, e.g. {unknown[0]!r}")
        if missing:
            raise MusarError(f"LoRA file {path} does not match the model: {len(missing)} keys missing, e.g. {missing[0]!r}")
        for name in sorted(keys):
            shape = tuple(header.tensors[name].shape)
            if shape != tuple(params[name].shape):  # from the header: a wrong shape is never allocated
                raise MusarError(
                    f"LoRA file {path} does not match the model: {name} has shape {shape}, "
                    f"the model expects {tuple(params[name].shape)}"
                )
        # Two passes over the (memory-mapped) file: every value is checked before any is copied,
        # so a bad file leaves the weights untouched, without holding a second copy of them all.
        for name in sorted(keys):
            _check_values(f.get_tensor(name), name, path)
        with torch.no_grad():
            for name in sorted(keys):
                params[name].copy_(f.get_tensor(name).to(params[name].dtype))
