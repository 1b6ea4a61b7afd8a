"""Putting the dual-branch LoRA into a model and taking it out (peft's ``model.py`` role).

Which linears are wrapped (``BranchLoRAConfig.targets``, fnmatch patterns over module paths), which
token rows each one sees (its *stream*, from where diffusers calls it), the model's one shared
:class:`~musar.lora.layer.RowPlan`, and the parameters saved in MUSAR LoRA files. The layer itself
is :mod:`musar.lora.layer`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator

from torch import nn

from musar.lora.config import BranchLoRAConfig
from musar.lora.layer import BranchLoRALinear, RowPlan, Stream
from musar.lora.peft_rows import is_peft_linear, restricted_active


def stream_of(module_path: str) -> Stream:
    """Which rows a linear layer sees, from its path in ``FluxTransformer2DModel``."""
    if module_path.startswith("single_transformer_blocks."):
        return "joint"
    if module_path == "proj_out":  # MusarTransformer projects the NOISE rows only
        return "output"
    leaf = module_path.split(".")
    if module_path == "context_embedder" or "ff_context" in leaf or leaf[-1] in {
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    }:
        return "text"
    return "image"


def token_stream(module_path: str) -> Stream | None:
    """:func:`stream_of` for layers whose input rows are tokens; None for the AdaLN modulation,
    time/guidance embedding and output-norm linears, whose input is a timestep embedding."""
    parts = module_path.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks") and len(parts) > 2:
        return None if parts[2].startswith("norm") else stream_of(module_path)
    if module_path in ("x_embedder", "context_embedder", "proj_out"):
        return stream_of(module_path)
    return None


def _is_wrapper(module: nn.Module) -> bool:
    return isinstance(module, BranchLoRALinear) or is_peft_linear(module)


def matching_linears(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Paths of the linears (plain, peft-wrapped or hosted) that ``targets`` match."""
    names: list[str] = []
    inside: list[str] = []  # wrappers seen: their inner linears are not targets of their own
    for name, mod in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if _is_wrapper(mod):
            inside.append(name + ".")
        if (isinstance(mod, nn.Linear) or _is_wrapper(mod)) and any(fnmatch.fnmatchcase(name, t) for t in targets):
            names.append(name)
    unmatched = [t for t in targets if not any(fnmatch.fnmatchcase(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"LoRA target patterns match no linear layer: {unmatched}")
    return names


def row_plan(model: nn.Module) -> RowPlan:
    """The model's shared :class:`RowPlan`, created on first use."""
    plan = getattr(model, "lora_plan", None)
    if plan is None:
        plan = RowPlan()
        model.lora_plan = plan
    return plan


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def inject_branch_lora(model: nn.Module, config: BranchLoRAConfig) -> RowPlan:
    """Wrap the target linears of ``model`` in :class:`BranchLoRALinear`; freeze everything else."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has a branch LoRA; remove it first")
    names = matching_linears(model, config.targets)
    plan = row_plan(model)
    plan.mode = config.mode
    model.requires_grad_(False)
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, BranchLoRALinear):  # a host of a restricted peft LoRA
            mod.add_branches(config)
        else:
            set_submodule(model, name, BranchLoRALinear(mod, config, stream_of(name), plan))
    for p in lora_parameters(model):
        p.requires_grad_(True)
    model.lora_config = config
    return plan


def remove_branch_lora(model: nn.Module) -> None:
    """Drop the branch LoRA; layers that still host a restricted peft LoRA keep their host."""
    for _, mod in list(model.named_modules()):
        if isinstance(mod, BranchLoRALinear):
            mod.remove_branches()
    model.lora_config = None
    release_hosts(model)


def release_hosts(model: nn.Module, everything: bool = False) -> None:
    """Put back the inner layer of every host that has nothing left to do (or of every host)."""
    plan = getattr(model, "lora_plan", None)
    kinds = plan.adapter_kinds if plan is not None else {}
    kept = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, BranchLoRALinear):
            continue
        if not everything and (len(mod.lora_A) or restricted_active(mod.base_layer, kinds, loaded=True)):
            kept += 1
            continue
        set_submodule(model, name, mod.base_layer)
    if kept == 0:
        model.lora_plan = None


def lora_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The branch LoRA's parameters (never a stacked peft LoRA's), as saved in MUSAR files."""
    for name, mod in model.named_modules():
        if isinstance(mod, BranchLoRALinear):
            for group in ("lora_A", "lora_B"):
                yield from getattr(mod, group).named_parameters(prefix=f"{name}.{group}")


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for _, p in lora_named_parameters(model):
        yield p
