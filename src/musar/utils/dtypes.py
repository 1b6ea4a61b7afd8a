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


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``: the CLI's spelling of a dtype, for records of what ran
    (a dtype the CLI has no name for keeps torch's, e.g. ``"float64"``)."""
    return next((n for n in DTYPE_NAMES if torch_dtype(n) == dtype), str(dtype).removeprefix("torch."))
