"""A peft LoRA layer seen row by row: what a host needs to apply some adapters on some rows only.

peft's ``LoraLayer`` adds each active adapter's delta to every row of its input. A standard LoRA
restricted to some token kinds must instead be added on those rows alone, so the host
(:class:`~musar.lora.layer.BranchLoRALinear`) asks peft for the output *without* the restricted
adapters and adds their deltas on their rows itself. Only peft's public per-adapter state is read
(``lora_A``/``lora_B``/``lora_dropout``/``scaling``, ``active_adapters``, ``merged_adapters``,
``disable_adapters``), so ``set_adapters``, ``delete_adapters`` and ``disable_lora`` keep working.
Only plain LoRA has a row-wise delta; DoRA and other peft variants are refused for restriction.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import torch
from torch import nn

from musar.errors import MusarError


@cache
def _peft_lora_layer() -> type | None:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; a broken install only disables stacking
        return None
    return LoraLayer


def is_peft_linear(module: nn.Module) -> bool:
    """A peft LoRA layer around an ``nn.Linear``."""
    cls = _peft_lora_layer()
    return cls is not None and isinstance(module, cls) and isinstance(module.get_base_layer(), nn.Linear)


def restricted_active(layer: nn.Module, kinds: Mapping[str, Any], loaded: bool = False) -> list[tuple[str, Any]]:
    """``[(adapter, kinds), ...]`` of the restricted adapters that ``layer`` applies now
    (``loaded``: that it carries at all)."""
    if not kinds or not is_peft_linear(layer):
        return []
    if loaded:
        names = list(layer.lora_A.keys())
    elif layer.disable_adapters:
        return []
    else:
        names = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
    return [(a, kinds[a]) for a in names if a in kinds]


def check_plain_lora(layer: nn.Module, adapter: str) -> None:
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        raise MusarError(
            f"LoRA {adapter!r} is not a plain LoRA (DoRA or another peft variant): it cannot be "
            "restricted to token kinds; load it without token_kinds"
        )


def peft_delta(layer: nn.Module, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """``B(A(dropout(x))) * scaling`` of one plain-LoRA adapter of a peft layer."""
    a, b = layer.lora_A[adapter], layer.lora_B[adapter]
    return b(a(layer.lora_dropout[adapter](x.to(a.weight.dtype)))) * layer.scaling[adapter]


def peft_output_without(layer: nn.Module, x: torch.Tensor, restricted: list[tuple[str, Any]]) -> torch.Tensor:
    """What ``layer(x)`` computes with the ``restricted`` adapters left out (merged ones are in the
    base weight already)."""
    skip = {name for name, _ in restricted}
    out = layer.get_base_layer()(x)
    for adapter in layer.active_adapters:
        if adapter in skip or adapter not in layer.lora_A or adapter in layer.merged_adapters:
            continue
        check_plain_lora(layer, adapter)
        out = out + peft_delta(layer, adapter, x).to(out.dtype)
    return out
