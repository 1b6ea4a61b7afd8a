"""`musar generate` end to end on the tiny preset, and every bad input through a real subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from musar.cli import main
from musar.lora import BranchLoRAConfig, inject_branch_lora
from musar.lora.io import save_branch_lora
from musar.models.transformer import MusarTransformer

PROMPT = "a corgi, a red backpack and a teapot on the beach"
PHRASES = ["a corgi", "a red backpack", "a teapot"]
FAST = ["--preset", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--condition-size", "32"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("imgs")
    paths = {}
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 200, 30)), ("c", (30, 30, 200))):
        paths[name] = d / f"{name}.png"
        Image.new("RGB", (40, 30), colour).save(paths[name])
    good = (d / "a.png").read_bytes()
    (d / "trunc.png").write_bytes(good[: len(good) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    paths.update({k: d / f"{k}.png" for k in ("trunc", "empty", "text")})
    return paths


@pytest.mark.parametrize("c", [1, 2, 3])
def test_generate_writes_image_sidecar_and_maps(images: dict[str, Path], tmp_path: Path, c: int) -> None:
    subjects = []
    for k in range(c):
        subjects += ["--subject", str(images["abc"[k]]), PHRASES[k]]
    out = tmp_path / "out.png"
    maps = tmp_path / "maps"
    rc = main(["generate", "--prompt", PROMPT, *subjects, *FAST, "--seed", "7", "--out", str(out), "--routing-maps", str(maps)])
    assert rc == 0
    assert Image.open(out).size == (64, 64)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["seed"] == 7 and side["steps"] == 2 and side["preset"] == "tiny" and side["prompt"] == PROMPT
    assert [s["phrase"] for s in side["subjects"]] == PHRASES[:c]
    assert {"encode_s", "denoise_s", "total_s", "load_s"} <= side["timings_s"].keys()
    assert side["lora"] is None and side["dynamic_routing"] is True
    assert side["image_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()  # the sidecar is this image's
    if c >= 2:
        assert Image.open(maps / "routing_grid.png").size[0] > 0
        assert Image.open(maps / "route_overlay.png").size == (64, 64)
    else:
        assert not (maps / "routing_grid.png").exists()
    assert not [p for p in tmp_path.rglob("*.tmp*")], "no temporary files left behind"


def test_lora_is_recorded_with_its_hash(images: dict[str, Path], tmp_path: Path) -> None:
    from musar.pipelines.presets import tiny_pipeline

    transformer = tiny_pipeline().transformer
    inject_branch_lora(transformer, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    lora = save_branch_lora(transformer, tmp_path / "lora.safetensors")
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", PROMPT, "--subject", str(images["a"]), "a corgi", *FAST, "--lora", str(lora), "--out", str(out)]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert len(side["lora"]["sha256"]) == 64


def _mismatched_lora(tmp: Path) -> Path:
    other = MusarTransformer(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                             num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=16,
                             guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    inject_branch_lora(other, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    return save_branch_lora(other, tmp / "other.safetensors")


def test_bad_inputs_exit_2_with_one_line(images: dict[str, Path], tmp_path: Path) -> None:
    a = str(images["a"])
    ok = ["--prompt", PROMPT, "--subject", a, "a corgi"]
    wrong_lora = _mismatched_lora(tmp_path)
    out = ["--out", str(tmp_path / "o.png")]
    cases = {
        "reference image not found": ["--prompt", PROMPT, "--subject", str(tmp_path / "nope.png"), "a corgi", *out],
        "cannot decode image": ["--prompt", PROMPT, "--subject", str(images["trunc"]), "a corgi", *out],
        "not an image file: " + str(images["empty"]): ["--prompt", PROMPT, "--subject", str(images["empty"]), "a corgi", *out],
        "not an image file: " + str(images["text"]): ["--prompt", PROMPT, "--subject", str(images["text"]), "a corgi", *out],
        "'a cat' does not appear": ["--prompt", PROMPT, "--subject", a, "a cat", *out],
        "overlaps another subject phrase": [*ok, "--subject", a, "corgi", *out],
        "expected 2 arguments": ["--prompt", PROMPT, "--subject", a, *out],
        "argument --height: must be a multiple of 16": [*ok, "--height", "100", *out],
        "argument --width: must be between 64 and 4096": [*ok, "--width", "8192", *out],
        "argument --steps: must be between 1 and 1000": [*ok, "--steps", "0", *out],
        "not writable": [*ok, "--out", "/proc/musar/x.png"],
        "unknown preset 'huge'": ["--prompt", PROMPT, "--subject", a, "a corgi", "--preset", "huge", *out],
        "does not match the model": [*ok, "--lora", str(wrong_lora), *out],
        "not a safetensors file": [*ok, "--lora", a, *out],
    }

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        preset = [] if "--preset" in args else ["--preset", "tiny"]
        cmd = [sys.executable, "-m", "musar.cli", "generate", *preset, "--steps", "1", "--height", "64", "--width", "64",
               "--condition-size", "32", *args]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(run, cases.values())))
    for message, proc in results.items():
        assert proc.returncode == 2, (message, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], (message, proc.stderr[-2000:])
    assert torch.__version__  # keep torch imported: the subprocesses above import the same install
