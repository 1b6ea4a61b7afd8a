"""What a loaded model holds: stored bytes and weight classes, quantised or not.

Kept apart from :mod:`musar.pipelines.quantization` (which builds configs and loads): the bench and
the tests read these numbers of any pipeline, and reading them needs no quantisation backend.
"""

from __future__ import annotations

import torch
from torch import nn


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a weight holds, looking inside tensor subclasses (torchao) and quantisation state
    (bitsandbytes): ``numel * element_size`` of a quantised tensor reports its logical dtype."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    size = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: absmax (and nested state2)
    while state is not None:
        size += state.absmax.numel() * state.absmax.element_size()
        state = getattr(state, "state2", None)
    return size


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored (quantised weights at their packed size)."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def linear_weight_kinds(module: nn.Module) -> dict[str, int]:
    """How many base ``nn.Linear`` layers hold each weight class (e.g. ``{'Int8Tensor': 36}``);
    a branch LoRA's own low-rank linears are not counted."""
    kinds: dict[str, int] = {}
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and not {"lora_A", "lora_B"} & set(name.split(".")):
            name = type(mod.weight).__name__
            kinds[name] = kinds.get(name, 0) + 1
    return kinds

