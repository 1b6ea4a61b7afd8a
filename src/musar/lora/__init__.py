"""MUSAR's dual-branch LoRA, split as peft splits an adapter: config, layer + injection, file IO.

* :mod:`musar.lora.config` — :class:`BranchLoRAConfig` (ranks, scales, targets, mode);
* :mod:`musar.lora.layer` — :class:`BranchLoRALinear`, the row plan and injection into a model;
* :mod:`musar.lora.io` — safetensors save/load of MUSAR LoRA files.
"""

from musar.lora.config import DEFAULT_TARGETS, BranchLoRAConfig
from musar.lora.layer import (
    BranchLoRALinear,
    RowPlan,
    inject_branch_lora,
    lora_named_parameters,
    lora_parameters,
    remove_branch_lora,
)

__all__ = [
    "DEFAULT_TARGETS",
    "BranchLoRAConfig",
    "BranchLoRALinear",
    "RowPlan",
    "inject_branch_lora",
    "lora_named_parameters",
    "lora_parameters",
    "remove_branch_lora",
]
