"""Bad input to every command, through a real subprocess: exit 2, one line, nothing touched.

Each row is a command line that must be refused. The checks: exit code 2; stderr is exactly one
line, ``musar <command>: error: ...`` containing the row's text; no traceback; the row's own
folder and the shared fixtures are byte for byte as before (nothing created, replaced or
removed); and no model stack was imported (torch not at all, except by ``train``, whose config
classes need it; diffusers, transformers and gradio never), which is what makes each row cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from train_fixtures import REPO, tiny_config

# The wrapper runs the CLI and records which heavy modules it imported into a file beside (not
# inside) the row's folder.
WRAPPER = """
import json, os, sys
from musar.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
heavy = [m for m in ("torch", "diffusers", "transformers", "gradio") if m in sys.modules]
with open(os.environ["MUSAR_TEST_IMPORTS"], "w") as f:
    json.dump(heavy, f)
sys.exit(rc)
"""

PROMPT = "a corgi on the beach"
GEN = ["generate", "--prompt", PROMPT, "--subject", "{fx}/dog.png", "a corgi", "--preset", "tiny", "--out", "{w}/o.png"]
EVAL = ["eval", "--protocol", "custom", "--data", "{fx}/cases.json", "--preset", "tiny", "--skip-metrics",
        "--out", "{w}/run"]
TRAIN = ["train", "--config", str(REPO / "configs" / "tiny.yaml")]
UI = ["ui", "--preset", "tiny", "--out-dir", "{w}/ui", "--port", "{free_port}"]
BENCH = ["bench", "--preset", "tiny", "--device", "cpu", "--out", "{w}/b.json"]
MAX_SEED = "9223372036854775807"
# Two subjects at 64x64 for the layout boxes; BOXES[-2:] is the --out.
BOXES = ["generate", "--prompt", "a corgi and a teapot on the beach", "--subject", "{fx}/dog.png", "a corgi",
         "--subject", "{fx}/dog.png", "a teapot", "--preset", "tiny", "--height", "64", "--width", "64", "--out", "{w}/o.png"]

# (row id, argv, text the one error line must contain)
ROWS: list[tuple[str, list[str], str]] = [
    # -- the table ------------------------------------------------------------------------
    ("bomb-30000x30000-png", [*GEN[:4], "{fx}/bomb.png", "a corgi", *GEN[6:]], "image too large"),
    ("seed-overflow", [*GEN, "--seed", "99999999999999999999999"], f"argument --seed: must be between 0 and {MAX_SEED}"),
    ("guidance-nan", [*GEN, "--guidance", "nan"], "argument --guidance: must be a finite number, got nan"),
    ("guidance-inf", [*GEN, "--guidance", "inf"], "argument --guidance: must be a finite number, got inf"),
    ("condition-size-160000", [*GEN, "--condition-size", "160000"], "argument --condition-size: must be between 16 and 2048"),
    ("sidecar-path-is-a-folder", [*GEN[:-1], "{w}/p.png"], "argument --out: output path is a folder"),
    ("resume-truncated-optimizer", [*TRAIN, "--output-dir", "{fx}/damaged", "--resume", "{fx}/damaged/checkpoints/step_00000004"],
     "optimizer.safetensors is truncated"),
    # -- and the smaller ones --------------------------------------------------------------------------
    ("image-144-megapixels", [*GEN[:4], "{fx}/big144.png", "a corgi", *GEN[6:]], "above the limit of 50,000,000 pixels"),
    ("image-above-a-lowered-limit", [*GEN, "--max-image-pixels", "100"], "above the limit of 100 pixels"),
    ("lora-missing", [*GEN, "--lora", "{fx}/nope.safetensors"], "argument --lora: LoRA file not found"),
    ("preset-huge", [*GEN, "--preset", "huge"], "argument --preset: unknown preset 'huge'"),
    ("eval-height-50", [*EVAL, "--height", "50"], "argument --height: must be between 64 and 4096, got 50"),
    # The run's own data (the fixture named it absolutely; configs/tiny.yaml's path is relative to the
    # cwd), so the only thing wrong is max_steps.
    ("train-past-max-steps", [*TRAIN, "--output-dir", "{fx}/run", "--resume", "latest", "--max-steps", "2",
                              "--set", f"data.source={REPO / 'examples' / 'data' / 'toy_pairs.parquet'}"],
     "is at step 4, past max_steps 2"),
    # -- generate: numbers -------------------------------------------------------------------------
    ("seed-negative", [*GEN, "--seed", "-1"], "argument --seed: must be between 0"),
    ("seed-text", [*GEN, "--seed", "abc"], "argument --seed: not an integer: 'abc'"),
    ("guidance-huge", [*GEN, "--guidance", "1e400"], "argument --guidance: must be a finite number"),
    ("guidance-negative", [*GEN, "--guidance", "-1"], "argument --guidance: must be between 0 and 100"),
    ("steps-0", [*GEN, "--steps", "0"], "argument --steps: must be between 1 and 1000, got 0"),
    ("steps-huge", [*GEN, "--steps", "1000000000"], "argument --steps: must be between 1 and 1000"),
    ("height-not-multiple", [*GEN, "--height", "100"], "argument --height: must be a multiple of 16, got 100"),
    ("width-too-large", [*GEN, "--width", "8192"], "argument --width: must be between 64 and 4096"),
    ("height-fraction", [*GEN, "--height", "512.5"], "argument --height: not an integer: '512.5'"),
    ("condition-size-not-multiple", [*GEN, "--condition-size", "100"], "argument --condition-size: must be a multiple of 16"),
    ("max-pixels-0", [*GEN, "--max-image-pixels", "0"], "argument --max-image-pixels: must be between 1 and"),
    # -- generate: paths, presets, files ---------------------------------------------------------
    ("out-is-a-folder", [*GEN[:-1], "{w}/adir"], "argument --out: must be a .png file"),
    ("out-png-folder", [*GEN[:-1], "{w}/dir.png"], "argument --out: output path is a folder"),
    ("out-under-a-file", [*GEN[:-1], "{w}/afile/x.png"], "is a file, not a folder"),
    ("out-not-png", [*GEN[:-1], "{w}/o.jpg"], "argument --out: must be a .png file"),
    ("out-unwritable", [*GEN[:-1], "/proc/musar/x.png"], "argument --out: output path is not writable"),
    ("maps-is-a-file", [*GEN, "--routing-maps", "{w}/afile"], "argument --routing-maps: output folder is a file"),
    ("maps-file-is-a-folder", [*GEN, "--routing-maps", "{w}/maps"], "argument --routing-maps: output path is a folder"),
    ("lora-not-safetensors", [*GEN, "--lora", "{fx}/dog.png"], "is not a safetensors file"),
    ("lora-truncated", [*GEN, "--lora", "{fx}/truncated.safetensors"], "is truncated"),
    ("lora-foreign", [*GEN, "--lora", "{fx}/foreign.safetensors"], "not a MUSAR branch LoRA"),
    ("lora-is-a-folder", [*GEN, "--lora", "{w}/adir"], "LoRA file is a folder"),
    ("model-missing-folder", [*GEN[:6], "--model", "./nowhere/flux", "--out", "{w}/o.png"],
     "neither an existing folder nor a hub id"),
    ("model-folder-without-index", [*GEN[:6], "--model", "{w}/adir", "--out", "{w}/o.png"], "has no model_index.json"),
    ("subject-missing", [*GEN[:4], "{fx}/nope.png", "a corgi", *GEN[6:]], "reference image not found"),
    ("subject-truncated", [*GEN[:4], "{fx}/trunc.png", "a corgi", *GEN[6:]], "cannot decode image"),
    ("subject-not-an-image", [*GEN[:4], "{fx}/text.png", "a corgi", *GEN[6:]], "not an image file"),
    ("subject-is-a-folder", [*GEN[:4], "{w}/adir", "a corgi", *GEN[6:]], "reference image is a directory"),
    ("phrase-not-in-prompt", [*GEN[:5], "a cat", *GEN[6:]], "'a cat' does not appear"),
    ("phrase-empty", [*GEN[:5], " ", *GEN[6:]], "a subject phrase is empty"),
    ("prompt-blank", [GEN[0], "--prompt", "  ", *GEN[3:]], "argument --prompt: prompt is empty"),
    ("choice-unknown", [*GEN, "--attention", "magic"], "argument --attention: invalid choice"),
    # -- generate: layout boxes ------------------------------------------------------------------
    ("box-coordinate-above-1", [*BOXES, "--box", "0", "0", "1.5", "1", "--box", "none"],
     "box 1 (0, 0, 1.5, 1): coordinates are fractions of the image in [0, 1], got 1.5"),
    ("box-coordinate-negative", [*BOXES, "--box", "none", "--box", "-0.1", "0", "0.5", "1"],
     "box 2 (-0.1, 0, 0.5, 1): coordinates are fractions"),
    ("box-coordinate-nan", [*BOXES, "--box", "0", "nan", "0.5", "1", "--box", "none"], "coordinates must be finite numbers, got nan"),
    ("box-x1-before-x0", [*BOXES, "--box", "0.6", "0", "0.4", "1", "--box", "none"],
     "box 1 (0.6, 0, 0.4, 1): x1 must be greater than x0"),
    ("box-y1-at-y0", [*BOXES, "--box", "0", "0.5", "1", "0.5", "--box", "none"], "y1 must be greater than y0"),
    ("box-below-one-token", [*BOXES, "--box", "0", "0", "0.15", "1", "--box", "none"],
     "is 9.6x64 px at 64x64, smaller than one 16x16 px token"),
    ("box-count-short", [*BOXES, "--box", "0", "0", "0.5", "1"], "got 1 --box for 2 subjects: give one --box per --subject"),
    ("box-count-long", [*BOXES, "--box", "none", "--box", "none", "--box", "none"], "got 3 --box for 2 subjects"),
    ("box-three-numbers", [*BOXES, "--box", "none", "--box", "0", "0", "1"], "--box 2 takes 4 numbers X0 Y0 X1 Y1 or 'none', got '0 0 1'"),
    ("box-without-dynamic-routing", [*BOXES, "--box", "0", "0", "0.5", "1", "--box", "none", "--no-dynamic-routing"],
     "boxes steer dynamic routing, which is switched off: turn it on (drop --no-dynamic-routing"),
    ("outside-boxes-without-box", [*BOXES, "--outside-boxes", "none"], "--outside-boxes none needs --box"),
    # -- eval ------------------------------------------------------------------------------------------
    ("eval-seeds-repeat", [*EVAL, "--seeds", "1", "1"], "argument --seeds: seeds repeat: [1]"),
    ("eval-seed-negative", [*EVAL, "--seeds", "-3"], "argument --seeds: must be between 0"),
    ("eval-limit-0", [*EVAL, "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    ("eval-guidance-nan", [*EVAL, "--guidance", "nan"], "argument --guidance: must be a finite number"),
    ("eval-batch-0", [*EVAL, "--metrics-batch-size", "0"], "argument --metrics-batch-size: must be between 1"),
    ("eval-attention-unknown", [*EVAL, "--attention", "magic"], "argument --attention: invalid choice"),
    ("eval-out-is-a-file", [*EVAL[:-1], "{w}/afile"], "argument --out: output folder is a file"),
    ("eval-data-missing", [*EVAL[:4], "{fx}/nope.json", *EVAL[5:]], "argument --data: not found"),
    ("eval-bad-cases", [*EVAL[:4], "{fx}/bad.json", *EVAL[5:]], "cannot read custom cases"),
    ("eval-case-image-bomb", [*EVAL[:4], "{fx}/bomb_cases.json", *EVAL[5:]], "image too large"),
    ("eval-case-image-truncated", [*EVAL[:4], "{fx}/trunc_cases.json", *EVAL[5:]], "cannot decode image"),
    ("eval-lora-missing", [*EVAL, "--lora", "{fx}/nope.safetensors"], "LoRA file not found"),
    ("eval-preset-huge", [*EVAL[:5], "--preset", "huge", *EVAL[7:]], "unknown preset 'huge'"),
    ("eval-metric-model", [*EVAL[:-3], "--dino-model", "./no/dino", "--out", "{w}/run"], "neither an existing folder"),
    ("eval-missing-protocol", ["eval", "--data", "{fx}/cases.json", "--out", "{w}/run"], "--protocol required"),
    ("eval-compare-missing", ["eval", "compare", "{w}/nope"], "argument dirs: folder not found"),
    # -- train -----------------------------------------------------------------------------------------
    ("train-max-steps-0", [*TRAIN, "--max-steps", "0"], "argument --max-steps: must be >= 1, got 0"),
    ("train-config-missing", ["train", "--config", "{w}/nope.yaml"], "argument --config: config file not found"),
    ("train-config-folder", ["train", "--config", "{w}/adir"], "config file is a folder"),
    ("train-set-malformed", [*TRAIN, "--set", "novalue"], "argument --set: not of the form KEY=VALUE"),
    ("train-output-dir-is-a-file", [*TRAIN, "--output-dir", "{w}/afile"], "argument --output-dir: output folder is a file"),
    ("train-resume-missing", [*TRAIN, "--resume", "{w}/nope"], "argument --resume: checkpoint folder not found"),
    ("train-config-lr-nan", [*TRAIN, "--output-dir", "{w}/t", "--set", "optim.lr=.nan"], "expected a finite number"),
    ("train-config-seed", [*TRAIN, "--output-dir", "{w}/t", "--set", "seed=99999999999"],
     "config seed must be between 0 and 4294967295"),
    ("train-config-guidance", [*TRAIN, "--output-dir", "{w}/t", "--set", "validation.guidance=.inf"], "finite number"),
    ("train-all-checkpoints-damaged", [*TRAIN, "--output-dir", "{fx}/alldamaged", "--resume", "latest"],
     "no valid checkpoint"),
    ("train-existing-run-without-resume", [*TRAIN, "--output-dir", "{fx}/run"], "pass --resume latest"),
    # -- ui --------------------------------------------------------------------------------------------
    ("ui-port-0", [*UI[:-1], "0"], "argument --port: must be between 1 and 65535, got 0"),
    ("ui-port-text", [*UI[:-1], "http"], "argument --port: not an integer"),
    ("ui-port-busy", [*UI[:-1], "{busy_port}"], "is in use"),
    ("ui-out-dir-is-a-file", [*UI[:3], "--out-dir", "{w}/afile", *UI[5:]], "argument --out-dir: output folder is a file"),
    ("ui-lora-missing", [*UI, "--lora", "{fx}/nope.safetensors"], "LoRA file not found"),
    ("ui-preset-huge", ["ui", "--preset", "huge", *UI[3:]], "unknown preset 'huge'"),
    ("ui-max-pixels", [*UI, "--max-image-pixels", "-5"], "argument --max-image-pixels: must be between 1"),
    # -- bench -----------------------------------------------------------------------------------------
    ("bench-refs-negative", [*BENCH, "--refs", "-1"], "argument --refs: must be between 0 and 16"),
    ("bench-height", [*BENCH, "--height", "100"], "argument --height: must be a multiple of 16"),
    ("bench-cond-size", [*BENCH, "--cond-size", "0"], "argument --cond-size: must be between 16 and 2048"),
    ("bench-repeats", [*BENCH, "--repeats", "0"], "argument --repeats/--steps: must be between 1"),
    ("bench-warmup", [*BENCH, "--warmup", "-1"], "argument --warmup: must be between 0"),
    ("bench-threads", [*BENCH, "--threads", "0"], "argument --threads: must be between 1"),
    ("bench-seed", [*BENCH, "--seed", "-5"], "argument --seed: must be between 0"),
    ("bench-prompt-len", [*BENCH, "--prompt-len", "0"], "argument --prompt-len: must be between 1"),
    ("bench-device", [*BENCH, "--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N"),
    ("bench-out-is-a-folder", [*BENCH[:-1], "{w}/adir"], "argument --out: output path is a folder"),
]


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that declares ``width`` x ``height`` (its pixel data never decodes that far)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: folders by name, files by content hash and mode."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mode:o} {path.stat().st_mtime_ns}"
    return out


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fx = tmp_path_factory.mktemp("fixtures")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(fx / "dog.png")
    good = (fx / "dog.png").read_bytes()
    (fx / "trunc.png").write_bytes(good[: len(good) // 2])
    (fx / "text.png").write_text("not an image")
    (fx / "bomb.png").write_bytes(png_header(30000, 30000))
    (fx / "big144.png").write_bytes(png_header(12000, 12000))
    tensors = {"x.lora_A.noise.weight": np.zeros((2, 4), np.float32)}
    save_file(tensors, str(fx / "lora.safetensors"), metadata={"format": "musar-branch-lora", "lora_config": "{}"})
    (fx / "truncated.safetensors").write_bytes((fx / "lora.safetensors").read_bytes()[:-8])
    save_file(tensors, str(fx / "foreign.safetensors"))
    (fx / "cases.json").write_text(json.dumps([{"prompt": PROMPT, "subjects": [{"image": "dog.png", "phrase": "a corgi"}]}]))
    (fx / "bad.json").write_text("[{")
    (fx / "bomb_cases.json").write_text(json.dumps([{"prompt": PROMPT, "subjects": [{"image": "bomb.png", "phrase": "a corgi"}]}]))
    (fx / "trunc_cases.json").write_text(json.dumps([{"prompt": PROMPT, "subjects": [{"image": "trunc.png", "phrase": "a corgi"}]}]))
    return fx


@pytest.fixture(scope="module")
def runs(fixtures: Path) -> Path:
    """A 4-step tiny run with checkpoints at steps 2 and 4, and two damaged copies of it."""
    from musar.train import train

    train(tiny_config(fixtures / "run", "max_steps=4", "checkpoint_every=2", "keep_last=0", "validate_every=0"))
    for name in ("damaged", "alldamaged"):
        shutil.copytree(fixtures / "run", fixtures / name)
    opt = fixtures / "damaged" / "checkpoints" / "step_00000004" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:-100])
    for ckpt in (fixtures / "alldamaged" / "checkpoints").iterdir():
        opt = ckpt / "optimizer.safetensors"
        opt.write_bytes(opt.read_bytes()[:-100])
    return fixtures


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("argv", "message"), [(a, m) for _, a, m in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(
    argv: list[str], message: str, runs: Path, busy_port: int, tmp_path: Path
) -> None:
    fx = runs
    work = tmp_path / "work"
    work.mkdir()
    (work / "p.png").write_bytes(b"an older image")  # must survive every refused command
    (work / "p.json").mkdir()
    (work / "dir.png").mkdir()
    (work / "afile").write_text("a file where a folder is expected")
    (work / "adir").mkdir()
    (work / "maps").mkdir()
    (work / "maps" / "routing.json").mkdir()
    values = {"fx": fx, "w": work, "busy_port": busy_port, "free_port": free_port()}
    args = [a.format(**values) for a in argv]
    before, before_fx = snapshot(work), snapshot(fx)
    imports = tmp_path / "imports.json"
    env = dict(os.environ, MUSAR_TEST_IMPORTS=str(imports))
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, cwd=work, env=env,
                          timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"musar {args[0]}: error: ") and message in lines[0], lines[0]
    assert snapshot(work) == before and snapshot(fx) == before_fx, "a refused command changed files"
    heavy = set(json.loads(imports.read_text()))
    assert not heavy & {"diffusers", "transformers", "gradio"}, heavy
    if args[0] != "train":  # train's config classes import torch; nothing else needs it to say no
        assert "torch" not in heavy, heavy
