"""A normal run prints no warning: the CLI on the tiny and toy presets, stderr read in a subprocess.

Progress bars (tqdm, on stderr) are not warnings and are removed before the check; everything
else on stderr must be exactly what MUSAR itself says.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TINY_NOTICE = "musar: preset 'tiny' has RANDOM weights: the image is noise, for smoke tests only."


def _stderr_lines(source: list[str], out: Path) -> list[str]:
    """MUSAR's and the libraries' stderr lines of one 1-step 64 px generation (progress bars removed)."""
    cmd = [
        sys.executable, "-m", "musar.cli", "generate", *source,
        "--prompt", "a photo of a corgi and a red backpack on a beach",
        "--subject", str(ROOT / "examples" / "dog.jpg"), "a corgi",
        "--subject", str(ROOT / "examples" / "backpack.jpg"), "a red backpack",
        "--steps", "1", "--height", "64", "--width", "64", "--out", str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    pieces = re.split(r"[\r\n]+", ANSI.sub("", done.stderr))
    return [p.strip() for p in pieces if p.strip() and "%|" not in p]


def test_int8wo_generation_prints_no_warning(tmp_path: Path) -> None:
    # The README's quantised run on CPU (float32): diffusers' "only bfloat16 is supported" line
    # is wrong for weight-only int8 and is dropped; nothing else may appear.
    pytest.importorskip("torchao", reason="--quantize int8wo needs the quant extra (torchao)")
    lines = _stderr_lines(["--preset", "tiny", "--quantize", "int8wo", "--dtype", "fp32"], tmp_path / "out.png")
    assert lines == [TINY_NOTICE]


@pytest.mark.parametrize(("preset", "expected"), [("tiny", [TINY_NOTICE]), ("toy", [])])
def test_generate_prints_no_warning(preset: str, expected: list[str], tmp_path: Path) -> None:
    # toy is trained: no RANDOM-weights notice, and its codec loads without a type warning.
    assert _stderr_lines(["--preset", preset], tmp_path / "out.png") == expected


def test_generate_from_a_model_folder_prints_no_warning(tmp_path: Path) -> None:
    # A diffusers folder loaded in --dtype bf16 (the default): the components load in that dtype
    # and are not cast again, which diffusers would warn about ("should be kept in float32").
    from musar.pipelines.presets import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "flux")
    assert _stderr_lines(["--model", str(tmp_path / "flux")], tmp_path / "out.png") == []


def test_filters_drop_only_the_known_messages() -> None:
    import logging

    import musar  # installs the filters

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    cases = {
        "transformers.utils.import_utils": [
            ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` ...", False),
            ("`VideoMAEImageProcessor` requires torchvision (not installed); falling back to `X` ...", True),
            ("something else entirely", True),
        ],
        "diffusers.quantizers.torchao.torchao_quantizer": [
            ("You are trying to set torch_dtype to torch.float32 for integer quantization, but only bfloat16 "
             "is supported right now. Please set `torch_dtype=torch.bfloat16`.", False),
            ("You are trying to set torch_dtype to torch.float16 for integer quantization, but only bfloat16 "
             "is supported right now. Please set `torch_dtype=torch.bfloat16`.", True),
        ],
        "diffusers.pipelines.pipeline_utils": [
            ("Expected types for vae: (<class 'AutoencoderKL'>,), got <class 'musar.toy.codec.ToyCodec'>.", False),
            ("Expected types for vae: (<class 'AutoencoderKL'>,), got <class 'elsewhere.codec.Codec'>.", True),
        ],
    }
    assert musar.__version__
    for name, messages in cases.items():
        logger = logging.getLogger(name)
        handler = Keep()
        logger.addHandler(handler)
        try:
            for message, kept in messages:
                seen.clear()
                logger.warning(message)
                assert (seen == [message]) == kept, message
        finally:
            logger.removeHandler(handler)
