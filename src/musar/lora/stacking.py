"""Standard (peft) LoRAs stacked with the MUSAR LoRA on one transformer.

A community FLUX LoRA is loaded by diffusers and peft as usual: peft wraps the target
``nn.Linear`` in its ``LoraLayer``. Where the MUSAR LoRA already wraps that linear, the peft layer
goes *inside* the :class:`~musar.lora.layer.BranchLoRALinear` (its ``base_layer``), so the result
is the same whichever LoRA came first::

    BranchLoRALinear( base_layer = peft LoraLayer( base_layer = nn.Linear ) )

peft then adapts every token; the MUSAR branches add their deltas on their own rows.
diffusers' loaders look modules up by the paths the LoRA file names, so every diffusers/peft
operation that injects or removes layers runs inside :func:`unwrapped_hosts`, which shows peft
the plain FLUX module tree and puts the hosts back around whatever peft left there.

A LoRA loaded with ``token_kinds`` applies to those kinds' rows only: it is registered in the
:class:`~musar.lora.layer.RowPlan` and each token-row layer carrying it gets a host (one without
MUSAR branches where the MUSAR LoRA does not reach). Layers whose input is a timestep embedding
(AdaLN modulation, time/guidance embedders, the output norm) have no token rows: there the LoRA
applies in full.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from musar.errors import MusarError
from musar.lora.layer import BranchLoRALinear
from musar.lora.model import release_hosts, row_plan, set_submodule, token_stream
from musar.lora.peft_rows import check_plain_lora, is_peft_linear
from musar.models.layout import Kind

# User-facing names of token kinds; "condition" = both condition kinds.
TOKEN_KIND_NAMES: dict[str, tuple[Kind, ...]] = {
    "prompt": (Kind.PROMPT,),
    "noise": (Kind.NOISE,),
    "cond_image": (Kind.COND_IMAGE,),
    "cond_text": (Kind.COND_TEXT,),
    "condition": (Kind.COND_IMAGE, Kind.COND_TEXT),
}


def parse_token_kinds(kinds: Iterable[str] | str | None) -> frozenset[Kind] | None:
    """``("prompt", "noise")`` -> kinds; None or every kind -> None (the LoRA adapts every token)."""
    if kinds is None:
        return None
    names = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in names if k not in TOKEN_KIND_NAMES]
    if unknown or not names:
        raise MusarError(
            f"unknown token kind(s) {unknown or names!r}; expected some of {', '.join(TOKEN_KIND_NAMES)}"
        )
    chosen = frozenset(k for name in names for k in TOKEN_KIND_NAMES[name])
    return None if chosen == frozenset(Kind) else chosen


@contextmanager
def unwrapped_hosts(model: nn.Module) -> Iterator[None]:
    """Show diffusers/peft the plain module tree; afterwards, host whatever sits at each path."""
    hosts = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, BranchLoRALinear)]
    for name, host in hosts:
        set_submodule(model, name, host.base_layer)
    try:
        yield
    finally:
        for name, host in hosts:
            host.base_layer = model.get_submodule(name)
            set_submodule(model, name, host)


def restrict_adapter(model: nn.Module, adapter: str, kinds: frozenset[Kind]) -> None:
    """Apply the loaded peft adapter ``adapter`` to rows of ``kinds`` only."""
    layers = [(name, mod) for name, mod in model.named_modules() if is_peft_linear(mod) and adapter in mod.lora_A]
    if not layers:
        raise MusarError(f"LoRA {adapter!r} adapts no linear layer of the transformer")
    for _, layer in layers:
        check_plain_lora(layer, adapter)
    plan = row_plan(model)
    plan.adapter_kinds[adapter] = kinds
    for name, layer in layers:
        parent_name, _, _ = name.rpartition(".")
        if isinstance(model.get_submodule(parent_name) if parent_name else model, BranchLoRALinear):
            continue  # already hosted
        stream = token_stream(name)
        if stream is not None:
            set_submodule(model, name, BranchLoRALinear(layer, None, stream, plan))


def forget_adapters(model: nn.Module, adapters: Iterable[str]) -> None:
    """Drop the token-kind restriction of deleted adapters and the hosts they no longer need."""
    plan = getattr(model, "lora_plan", None)
    if plan is not None:
        for adapter in adapters:
            plan.adapter_kinds.pop(adapter, None)
    release_hosts(model)
