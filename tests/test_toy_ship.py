"""``musar toy ship``: the base and the full LoRA into the package's assets, swapped in whole."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from musar.errors import MusarError
from musar.toy import model as toy_model

pytestmark = pytest.mark.skipif(not (toy_model.SHIPPED_BASE / "model_index.json").is_file(),
                                reason="the toy base is not shipped")


def test_ship_replaces_the_assets_whole_and_stores_the_transformer_in_fp16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from musar.toy.stages import ship

    out, assets = tmp_path / "run", tmp_path / "assets"
    shutil.copytree(toy_model.SHIPPED_BASE, out / "base")
    (out / "musar" / "full").mkdir(parents=True)
    shutil.copyfile(toy_model.SHIPPED_LORA, out / "musar" / "full" / "lora.safetensors")
    (assets / "base").mkdir(parents=True)
    (assets / "base" / "stale.txt").write_text("from the previous ship")
    monkeypatch.setattr(toy_model, "ASSETS", assets)
    monkeypatch.setattr(toy_model, "SHIPPED_BASE", assets / "base")
    monkeypatch.setattr(toy_model, "SHIPPED_LORA", assets / "musar_lora.safetensors")

    ship(out)
    assert not (assets / "base" / "stale.txt").exists()  # the old base went as a whole
    assert (assets / "base" / "model_index.json").is_file()
    assert sorted(p.name for p in assets.iterdir()) == ["base", "musar_lora.safetensors"]  # no staging left
    assert (assets / "musar_lora.safetensors").read_bytes() == toy_model.SHIPPED_LORA.read_bytes()
    with safe_open(str(assets / "base" / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}  # noqa: SIM118

    (out / "musar" / "full" / "lora.safetensors").unlink()
    with pytest.raises(MusarError, match="nothing to ship"):
        ship(out)
