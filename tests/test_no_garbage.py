"""No silent garbage: a NaN/inf latent or decoded image is one MusarError line, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from musar.cli import main
from musar.errors import MusarError
from musar.lora import BranchLoRAConfig, inject_branch_lora
from musar.lora.io import save_branch_lora
from musar.pipelines.presets import tiny_pipeline

PROMPT = "a corgi and a red backpack on the beach"
SUBJECTS = [(Image.new("RGB", (32, 32), (200, 40, 40)), "a corgi")]
ARGS = {"height": 64, "width": 64, "num_inference_steps": 2, "condition_size": 32, "progress": False}


def _poison(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        module.weight.fill_(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_non_finite_latents_raise_one_line(value: float) -> None:
    pipe = tiny_pipeline()
    _poison(pipe.transformer.proj_out, value)
    with pytest.raises(MusarError, match=r"^the denoised latents contain NaN/inf; .*nothing was written$") as info:
        pipe(PROMPT, SUBJECTS, **ARGS)
    assert "\n" not in str(info.value)


def test_non_finite_latents_raise_for_latent_output_too() -> None:
    pipe = tiny_pipeline()
    _poison(pipe.transformer.proj_out, float("nan"))
    with pytest.raises(MusarError, match="denoised latents contain NaN/inf"):
        pipe(PROMPT, SUBJECTS, output_type="latent", **ARGS)


def test_a_non_finite_decoded_image_raises() -> None:
    pipe = tiny_pipeline()
    _poison(pipe.vae.decoder.conv_out, float("inf"))
    with pytest.raises(MusarError, match=r"^the decoded pixels contain NaN/inf"):
        pipe(PROMPT, SUBJECTS, **ARGS)


def _lora(tmp: Path, value: float) -> Path:
    transformer = tiny_pipeline().transformer
    inject_branch_lora(transformer, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".lora_B." in name:
                p.fill_(value)
    return save_branch_lora(transformer, tmp / "poison.safetensors")


def _generate(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """Run ``musar generate`` on the tiny preset; assert exit 2, one line and no output; return it."""
    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(ref)
    out = tmp_path / "out" / "x.png"
    capsys.readouterr()
    rc = main(["generate", "--prompt", PROMPT, "--subject", str(ref), "a corgi", "--preset", "tiny", "--steps", "2",
               "--height", "64", "--width", "64", "--condition-size", "32", *extra, "--out", str(out),
               "--routing-maps", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()), "nothing was written"
    return errors[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_generate_with_poisoned_weights_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, value: float
) -> None:
    import musar.pipelines.presets as presets

    def poisoned(seed: int = 0) -> object:
        pipe = tiny_pipeline(seed)
        _poison(pipe.transformer.proj_out, value)
        return pipe

    monkeypatch.setattr(presets, "tiny_pipeline", poisoned)  # what the tiny preset builds
    assert "error: the denoised latents contain NaN/inf;" in _generate(tmp_path, capsys)


@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_generate_with_a_poisoned_lora_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: float
) -> None:
    # Refused when the LoRA loads (musar.lora.io checks its values) or, failing that, when the
    # latents come out non-finite: one line and no file either way.
    line = _generate(tmp_path, capsys, "--lora", str(_lora(tmp_path, value)))
    assert "NaN" in line or "magnitude" in line, line
