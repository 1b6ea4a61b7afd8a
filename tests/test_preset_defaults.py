"""Presets carry their generation defaults: `musar generate --preset toy` draws what the toy world draws.

Sizes, steps, guidance and token counts left out of the command line come from the preset
(musar.pipelines.presets.generation_defaults), else FLUX.1's; a flag always wins; the sidecar
records the values used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from musar.cli import main
from musar.cli.generate import FLUX_DEFAULTS, GENERATION_FLAGS, resolve_generation
from musar.pipelines.presets import FLUX_GENERATION, GenerationDefaults, generation_defaults
from musar.toy.cases import GEN_DEFAULTS, IMAGE_SIZE
from musar.toy.model import SHIPPED_BASE, SHIPPED_LORA

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "toy"
SHIPPED = (SHIPPED_BASE / "model_index.json").is_file() and SHIPPED_LORA.is_file()
needs_weights = pytest.mark.skipif(not SHIPPED, reason=f"the shipped toy weights are absent ({SHIPPED_BASE})")


def test_flux_defaults_are_the_pipelines_own() -> None:
    # --help states FLUX's defaults without importing torch; they must be MusarPipeline.__call__'s.
    assert dataclasses.asdict(FLUX_GENERATION) == FLUX_DEFAULTS
    assert tuple(f.name for f in dataclasses.fields(GenerationDefaults)) == GENERATION_FLAGS
    assert generation_defaults(None) == generation_defaults("tiny") == FLUX_GENERATION


def test_toy_preset_declares_the_toy_worlds_defaults() -> None:
    toy = generation_defaults("toy")
    assert (toy.height, toy.width) == (IMAGE_SIZE, IMAGE_SIZE)
    assert toy.steps == GEN_DEFAULTS["num_inference_steps"]
    assert (toy.condition_size, toy.phrase_tokens, toy.max_sequence_length) == (
        GEN_DEFAULTS["condition_size"], GEN_DEFAULTS["phrase_tokens"], GEN_DEFAULTS["max_sequence_length"])
    assert toy.guidance == FLUX_GENERATION.guidance  # declared by no one: FLUX's (the toy base ignores it)


def test_resolution_order_flag_then_preset_then_flux() -> None:
    blank = dict.fromkeys(GENERATION_FLAGS)
    flux = resolve_generation(argparse.Namespace(preset=None, **blank))
    assert {k: getattr(flux, k) for k in GENERATION_FLAGS} == FLUX_DEFAULTS
    toy = resolve_generation(argparse.Namespace(preset="toy", **{**blank, "height": 128, "steps": 3}))
    assert (toy.height, toy.steps, toy.width, toy.phrase_tokens) == (128, 3, IMAGE_SIZE, GEN_DEFAULTS["phrase_tokens"])


def _demo() -> tuple[str, list[str], list[Path]]:
    demo = json.loads((EXAMPLES / "demo.json").read_text())
    return demo["prompt"], demo["phrases"], [EXAMPLES / name for name in demo["references"]]


def _generate(tmp_path: Path, *extra: str) -> tuple[np.ndarray, dict]:
    prompt, phrases, refs = _demo()
    subjects = [arg for ref, phrase in zip(refs, phrases, strict=True) for arg in ("--subject", str(ref), phrase)]
    out = tmp_path / "toy.png"
    # --threads as the reference below runs: CPU kernels may round differently with other thread counts.
    argv = ["generate", "--preset", "toy", "--prompt", prompt, *subjects, "--seed", "0",
            "--threads", str(torch.get_num_threads()), "--out", str(out), *extra]
    assert main(argv) == 0
    return np.asarray(Image.open(out).convert("RGB")), json.loads(out.with_suffix(".json").read_text())


@needs_weights
def test_generate_toy_is_the_toy_worlds_image_bit_for_bit(tmp_path: Path) -> None:
    from musar.pipelines.presets import load_pipeline
    from musar.toy.cases import generate_case
    from musar.toy.demo import demo_case

    pixels, side = _generate(tmp_path)

    case = demo_case()
    _, phrases, refs = _demo()
    assert case.prompt == side["prompt"] and list(case.phrases) == phrases  # the same case as the demo's
    pipe = load_pipeline(preset="toy", device="cpu")
    references = [Image.open(ref).convert("RGB") for ref in refs]
    (expected,), _ = generate_case(pipe, case, (0,), references=references)

    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(pixels, np.asarray(expected.convert("RGB")))
    # generate_case routes with attention="fast"; the CLI's default "auto" is fast on the CPU
    assert side["attention"] == "auto" and side["attention_resolved"] == "fast"
    assert (side["height"], side["width"], side["steps"], side["condition_size"]) == (64, 64, 16, 64)
    assert (side["phrase_tokens"], side["max_sequence_length"], side["guidance"]) == (8, 64, FLUX_GENERATION.guidance)
    assert side["threads"] == torch.get_num_threads() and side["interop_threads"] >= 1
    # the preset loaded the shipped LoRA without --lora: the sidecar says so
    assert side["lora"]["path"] == str(SHIPPED_LORA.resolve()) and side["lora"]["from"] == "preset toy"
    # the dtype that ran (the toy preset keeps fp32), and the --dtype default it overrode
    assert side["dtype"] == "fp32" and side["dtype_requested"] == "bf16"


@needs_weights
def test_an_explicit_flag_wins_over_the_preset(tmp_path: Path) -> None:
    pixels, side = _generate(tmp_path, "--height", "128", "--steps", "2")
    assert pixels.shape == (128, IMAGE_SIZE, 3)
    assert (side["height"], side["steps"]) == (128, 2)  # given
    assert (side["width"], side["condition_size"], side["phrase_tokens"], side["max_sequence_length"]) == (
        IMAGE_SIZE, GEN_DEFAULTS["condition_size"], GEN_DEFAULTS["phrase_tokens"], GEN_DEFAULTS["max_sequence_length"])
