"""Shared tiny configs and helpers. Everything is random-weight, seeded and CPU-sized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DREAMBENCH = SHARED / "data" / "dreambench"

# FLUX architecture at toy size: 2 double + 2 single blocks, 2 heads of 16 dims.
TINY_FLUX_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "pooled_projection_dim": 12,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_flux_config() -> dict:
    return dict(TINY_FLUX_CONFIG)


@pytest.fixture
def dreambench_root() -> Path:
    if not (DREAMBENCH / "prompts_and_classes.txt").is_file():
        pytest.skip(f"DreamBench copy not found at {DREAMBENCH} (it lives in ../shared beside the repo)")
    return DREAMBENCH
