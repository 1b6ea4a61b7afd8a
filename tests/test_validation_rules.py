"""The validation rules themselves: number ranges (as argparse types and as API checks), image
headers before decoding, safetensors structure, and the pipeline refusing what the CLI refuses."""

from __future__ import annotations

import argparse
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from musar.errors import MusarError
from musar.utils.images import open_image
from musar.utils.tensorfile import read_header
from musar.utils.validation import GUIDANCE, RULES, SEED, Number


def edges(rule: Number) -> tuple[list[float], list[float]]:
    """Values a rule must accept and values it must refuse, from its own declaration."""
    ok, bad = [], [float("nan"), float("inf"), float("-inf")]
    step = rule.multiple_of or 1
    if rule.lo is not None:
        lo = rule.lo if not rule.multiple_of else -(-rule.lo // step) * step
        ok.append(lo)
        bad.append(lo - step)
    if rule.hi is not None:
        hi = rule.hi if not rule.multiple_of else rule.hi // step * step
        ok.append(hi)
        bad.append(hi + step)
    if rule.multiple_of and rule.lo is not None:
        bad.append(ok[0] + rule.multiple_of // 2)
    return ok, bad


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_every_rule_accepts_its_bounds_and_refuses_past_them(rule: Number) -> None:
    ok, bad = edges(rule)
    for v in ok:
        text = str(int(v)) if rule.kind is int else repr(float(v))
        assert rule(text) == v
        assert rule.check(rule.kind(v)) == v
    for v in bad:
        text = str(int(v)) if rule.kind is int and np.isfinite(v) else repr(v)
        with pytest.raises(argparse.ArgumentTypeError):
            rule(text)
        with pytest.raises(MusarError, match=rf"^{rule.name} must be"):
            rule.check(v)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^not an? (integer|number): "):
        rule("twelve")


def test_messages_name_the_value_and_the_range() -> None:
    with pytest.raises(MusarError, match=r"^seed must be between 0 and 9223372036854775807, got 99999999999999999999999$"):
        SEED.check(99999999999999999999999)
    with pytest.raises(MusarError, match=r"^guidance must be a finite number, got nan$"):
        GUIDANCE.check(float("nan"))
    with pytest.raises(MusarError, match="must be a whole number"):
        SEED.check(1.5)
    with pytest.raises(MusarError, match="must be a number"):
        SEED.check(True)


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("size", "limit", "message"), [
    ((30000, 30000), None, "image too large"),  # past Pillow's own decompression-bomb limit
    ((12000, 12000), None, "above the limit of 50,000,000 pixels"),  # 144 MP: ours, from the header
    ((100, 100), 9999, "above the limit of 9,999 pixels"),
])
def test_pixel_limit_is_checked_from_the_header(tmp_path: Path, size: tuple[int, int], limit: int | None, message: str) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(png_header(*size))
    with pytest.raises(MusarError, match=message):
        open_image(path, limit)


def test_any_decoder_failure_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(png_header(64, 64))  # a valid header and no pixel data at all
    with pytest.raises(MusarError, match="cannot decode image") as err:
        open_image(path)
    assert "\n" not in str(err.value)


def test_safetensors_structure(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": np.zeros((3, 4), np.float32), "b": np.ones(2, np.int64)}, str(path), metadata={"k": "v"})
    header = read_header(path)
    assert header.metadata == {"k": "v"} and header.tensors["a"].shape == (3, 4)
    data = path.read_bytes()
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(MusarError, match=r"is truncated: its header declares 64 data bytes, the file holds 63"):
        read_header(tmp_path / "short")
    (tmp_path / "long").write_bytes(data + b"\0")
    with pytest.raises(MusarError, match="is damaged"):
        read_header(tmp_path / "long")
    (tmp_path / "tiny").write_bytes(b"\1\0")
    with pytest.raises(MusarError, match="not a safetensors file"):
        read_header(tmp_path / "tiny")
    n = struct.unpack("<Q", data[:8])[0]
    lying = data[:8] + data[8 : 8 + n].replace(b'"F32"', b'"F64"') + data[8 + n :]
    (tmp_path / "lying").write_bytes(lying)
    with pytest.raises(MusarError, match="spans 48 bytes"):
        read_header(tmp_path / "lying")


def test_the_pipeline_refuses_what_the_cli_refuses() -> None:
    from musar.pipelines.presets import tiny_pipeline

    pipe = tiny_pipeline()
    examples = Path(__file__).resolve().parents[1] / "examples"
    for kwargs, message in (({"guidance_scale": float("nan")}, "guidance must be a finite number"),
                            ({"condition_size": 160000}, "condition size must be between 16 and 2048"),
                            ({"num_inference_steps": 5000}, "steps must be between 1 and 1000")):
        with pytest.raises(MusarError, match=message):
            pipe("a corgi", [(examples / "dog.jpg", "a corgi")], height=64, width=64, **kwargs)


def test_every_command_defaults_to_the_routing_options_backend(tmp_path: Path) -> None:
    """generate, eval, the UI and the pipeline offer the backends RoutingOptions knows, with its default."""
    import inspect

    from musar import cli
    from musar.models.options import RoutingOptions
    from musar.pipelines.pipeline_musar import MusarPipeline
    from musar.ui.logic import DEFAULT_ATTENTION, Request

    default = RoutingOptions().backend
    parser = cli.build_parser()
    generate = parser.parse_args(["generate", "--prompt", "a dog", "--subject", "d.png", "a dog"])
    evaluate = parser.parse_args(["eval", "--protocol", "custom", "--data", "c.json", "--out", str(tmp_path)])
    assert generate.attention == evaluate.attention == DEFAULT_ATTENTION == default
    assert Request("a dog", (("d.png", "a dog"),), 64, 64, 1, 3.5, 0).attention == default
    assert inspect.signature(MusarPipeline.__call__).parameters["attention"].default == default
