"""Model folders are judged before any weight loads: one line naming the file and the key."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from diffusers import FluxTransformer2DModel
from PIL import Image

from musar.cli import main
from musar.errors import MusarError
from musar.pipelines.model_folder import PARAM_BUDGET, check_model_folder, flux_transformer_params
from musar.pipelines.pipeline_musar import MusarPipeline
from musar.pipelines.presets import tiny_pipeline

TOY_BASE = Path(__file__).resolve().parents[1] / "src" / "musar" / "assets" / "toy" / "base"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flux") / "flux"
    tiny_pipeline().save_pretrained(folder)
    return folder


def _copy(saved: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(saved, tmp / "model"))


def _edit(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_good_folders_pass(saved: Path) -> None:
    check_model_folder(saved)
    check_model_folder(TOY_BASE)  # a registered component (the toy codec) as its VAE


INDEX_CASES: dict[str, tuple[Any, str]] = {
    "empty": ({}, "key '_class_name' is None"),
    "list": ([], "must hold a mapping at the top level, got list"),
    "other pipeline": ({"_class_name": "StableDiffusionPipeline"}, "key '_class_name' is 'StableDiffusionPipeline'"),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_a_broken_index_is_one_line(saved: Path, tmp_path: Path, case: str) -> None:
    folder = _copy(saved, tmp_path)
    index, message = INDEX_CASES[case]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(MusarError, match=r"model_index\.json") as info:
        MusarPipeline.from_pretrained(folder)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_non_utf8_index_is_one_line(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path)
    (folder / "model_index.json").write_bytes(b'{"_class_name": "\xff\xfe"}')
    with pytest.raises(MusarError, match=r"model_index.json is not UTF-8"):
        MusarPipeline.from_pretrained(folder)


ENTRY_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "text encoder as transformer": ({"transformer": ["transformers", "CLIPTextModel"]}, "key 'transformer' names 'CLIPTextModel' of transformers, which is not a diffusers ModelMixin"),
    "scheduler as transformer": ({"transformer": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}, "key 'transformer' names"),
    "not a class": ({"vae": ["diffusers", "__version__"]}, "key 'vae' names '__version__'"),
    "foreign library": ({"vae": ["os", "system"]}, "key 'vae' names library 'os'"),
    "missing class": ({"tokenizer": ["transformers", "NoSuchTokenizer"]}, "key 'tokenizer' names 'NoSuchTokenizer'"),
    "not a pair": ({"scheduler": "FlowMatchEulerDiscreteScheduler"}, "key 'scheduler' must be [library, class]"),
    "required slot empty": ({"text_encoder_2": [None, None]}, "key 'text_encoder_2' is empty"),
    "unknown slot": ({"controlnet": ["diffusers", "ModelMixin"]}, "key 'controlnet' is not a component"),
}


@pytest.mark.parametrize("case", sorted(ENTRY_CASES))
def test_an_unexpected_component_class_is_refused(saved: Path, tmp_path: Path, case: str) -> None:
    folder = _copy(saved, tmp_path)
    changes, message = ENTRY_CASES[case]
    _edit(folder / "model_index.json", **changes)
    with pytest.raises(MusarError, match=r"model_index\.json") as info:
        MusarPipeline.from_pretrained(folder)
    assert message in str(info.value), info.value


SIZE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "float layer count": ({"num_layers": 1e9}, "key 'num_layers' must be a whole number, got 1000000000.0"),
    "bool layer count": ({"num_single_layers": True}, "key 'num_single_layers' must be a whole number"),
    "negative": ({"num_attention_heads": -2}, "key 'num_attention_heads' must be between 0 and"),
    "string": ({"in_channels": "16"}, "key 'in_channels' must be a whole number"),
    "astronomical head dim": ({"attention_head_dim": 10**15}, "key 'attention_head_dim' must be between 0 and"),
    "a billion layers": ({"num_layers": 10**7}, "describes a model of about"),
    "a huge head dim": ({"attention_head_dim": 10**6}, "describes a model of about"),
}


@pytest.mark.parametrize("case", sorted(SIZE_CASES))
def test_transformer_sizes_are_bounded_before_allocation(saved: Path, tmp_path: Path, case: str) -> None:
    folder = _copy(saved, tmp_path)
    changes, message = SIZE_CASES[case]
    _edit(folder / "transformer" / "config.json", **changes)
    start = time.perf_counter()
    with pytest.raises(MusarError, match=r"transformer config .*config.json") as info:
        MusarPipeline.from_pretrained(folder)
    assert time.perf_counter() - start < 10, "refused at once, nothing allocated"
    assert message in str(info.value), info.value


def test_text_encoder_sizes_are_bounded_too(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path)
    _edit(folder / "text_encoder_2" / "config.json", d_model=1 << 20, d_ff=1 << 20)
    with pytest.raises(MusarError, match=r"text_encoder_2 config .* describes a model of about"):
        MusarPipeline.from_pretrained(folder)


def test_the_estimate_is_exact_and_flux_dev_fits(tiny_flux_config: dict) -> None:
    for config in (tiny_flux_config, dict(tiny_flux_config, guidance_embeds=False, out_channels=8, patch_size=2)):
        model = FluxTransformer2DModel(**config)
        assert flux_transformer_params(config) == sum(p.numel() for p in model.parameters())
    flux_dev = flux_transformer_params({"guidance_embeds": True})  # FluxTransformer2DModel's defaults are FLUX.1-dev's
    assert 11.8e9 < flux_dev < 12e9 and 2 * flux_dev <= PARAM_BUDGET


def test_the_cli_refuses_the_folder_before_importing_a_model(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy(saved, tmp_path)
    _edit(folder / "transformer" / "config.json", num_layers=10**7)
    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32)).save(ref)
    capsys.readouterr()
    rc = main(["generate", "--prompt", "a corgi", "--subject", str(ref), "a corgi", "--model", str(folder),
               "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "argument --model: transformer config" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_offline_hub_id_not_in_the_cache_names_the_cure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MusarError, match=r"not in the local Hugging Face cache.*huggingface-cli download org/model"):
        check_model_folder("org/model")
    # online, the hub is asked once (tests/test_hub_probe.py)
