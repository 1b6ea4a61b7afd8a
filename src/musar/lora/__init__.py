"""MUSAR's dual-branch LoRA, split as peft splits an adapter: config | layer | model, and file IO.

* :mod:`musar.lora.config` — :class:`BranchLoRAConfig` (ranks, scales, targets, mode);
* :mod:`musar.lora.layer` — :class:`BranchLoRALinear` and the row plan its layers share;
* :mod:`musar.lora.model` — injection into a model, removal, streams, the saved parameters;
* :mod:`musar.lora.io` — safetensors save/load of MUSAR LoRA files;
* :mod:`musar.lora.stacking` / :mod:`musar.lora.peft_rows` — standard peft LoRAs beside it.

Names load lazily: the training config reads :class:`BranchLoRAConfig` without importing torch.
"""

from __future__ import annotations

from musar.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "DEFAULT_TARGETS": "musar.lora.config",
    "BranchLoRAConfig": "musar.lora.config",
    "BranchLoRALinear": "musar.lora.layer",
    "RowPlan": "musar.lora.layer",
    "inject_branch_lora": "musar.lora.model",
    "lora_named_parameters": "musar.lora.model",
    "lora_parameters": "musar.lora.model",
    "remove_branch_lora": "musar.lora.model",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports("musar.lora", _EXPORTS)
