"""The shipped toy weights: load through the preset, generate, and the analyser reads the result."""

from __future__ import annotations

from pathlib import Path

import pytest

from musar.toy.model import SHIPPED_BASE, SHIPPED_LORA
from musar.toy.world import BACKGROUNDS

pytestmark = pytest.mark.skipif(
    not (SHIPPED_BASE / "model_index.json").is_file() or not SHIPPED_LORA.is_file(),
    reason="toy weights not shipped in this checkout (musar toy all && musar toy ship)",
)


def test_preset_loads_base_and_full_lora() -> None:
    from musar.pipelines.presets import load_pipeline
    from musar.utils.registry import preset_names

    assert "toy" in preset_names()  # registered by the toy package's entry point, not by the core
    pipe = load_pipeline(preset="toy", device="cpu")
    assert pipe.lora_path == str(SHIPPED_LORA)
    assert pipe.transformer.lora_config.mode == "dual"
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 5_000_000


def test_demo_generates_an_image_the_analyser_reads(tmp_path: Path) -> None:
    from PIL import Image

    from musar.toy.analyser import analyse
    from musar.toy.demo import run_demo

    text = run_demo(tmp_path, seed=0)
    image = Image.open(tmp_path / "composition.png")
    assert image.size == (64, 64)
    analysis = analyse(image)
    assert analysis.background in BACKGROUNDS
    assert "\nverdict: " in text and (tmp_path / "routing_grid.png").is_file()
    assert (tmp_path / "route_overlay.png").is_file()


def test_shipped_files_are_small() -> None:
    total = sum(f.stat().st_size for f in SHIPPED_BASE.rglob("*") if f.is_file()) + SHIPPED_LORA.stat().st_size
    assert total < 20 * 2**20
