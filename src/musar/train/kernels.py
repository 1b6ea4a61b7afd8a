"""Which SDPA kernels the training step may use on CUDA (docs/design.md sec. 9, docs/training.md).

The policy lives apart from the run setup because the training-step bench applies the same one
without building a run.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def sdpa_context(kind: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Restrict SDPA to the configured kernels on CUDA (forward *and* backward/recompute).

    Must enclose the backward too: with gradient checkpointing, attention is recomputed there.
    """
    if device.type != "cuda" or kind == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash_efficient": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
    }[kind]
    return sdpa_kernel(backends)
