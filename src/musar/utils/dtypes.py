"""Dtype names as the CLI and configs spell them, and the one map to torch dtypes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

DtypeName = Literal["bf16", "fp16", "fp32"]
DTYPE_NAMES: tuple[str, ...] = ("bf16", "fp16", "fp32")


def torch_dtype(name: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16`` (torch is imported here, not at module import)."""
    import torch

    from musar.errors import MusarError

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise MusarError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return table[name]
