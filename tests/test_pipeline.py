"""MusarPipeline on the tiny preset: shapes, determinism, local-folder loading, routing switches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from musar.errors import MusarError
from musar.pipelines.pipeline_musar import MusarPipeline
from musar.pipelines.presets import tiny_pipeline
from musar.utils.images import load_reference, to_rgb

PROMPT = "a corgi, a red backpack and a teapot on the beach"
PHRASES = ["a corgi", "a red backpack", "a teapot"]


@pytest.fixture(scope="module")
def pipe() -> MusarPipeline:
    return tiny_pipeline()


def _refs(c: int) -> list[tuple[Image.Image, str]]:
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    sizes = [(60, 40), (30, 50), (48, 48)]
    return [(Image.new("RGB", sizes[k], colours[k]), PHRASES[k]) for k in range(c)]


def _run(pipe: MusarPipeline, c: int = 2, seed: int = 0, **kw) -> np.ndarray:
    args = dict(height=64, width=96, num_inference_steps=2, condition_size=32, progress=False)
    args.update(kw)
    out = pipe(PROMPT, _refs(c), generator=torch.Generator().manual_seed(seed), **args)
    return np.asarray(out.images[0])


@pytest.mark.parametrize("c", [1, 2, 3])
def test_any_number_of_subjects(pipe: MusarPipeline, c: int) -> None:
    out = pipe(PROMPT, _refs(c), height=64, width=96, num_inference_steps=2, condition_size=32,
               generator=torch.Generator().manual_seed(0), return_routing=True, progress=False)
    assert out.images[0].size == (96, 64)
    assert out.grid == (4, 6)
    if c == 1:
        assert out.routing is not None and out.routing.steps == []  # nothing to route with one subject
    else:
        assert out.routing.steps == [0, 1]
        assert out.routing.affinity(0).shape == (1, 24, c)


def test_same_seed_same_image_on_cpu(pipe: MusarPipeline) -> None:
    assert np.array_equal(_run(pipe, seed=3), _run(pipe, seed=3))
    assert not np.array_equal(_run(pipe, seed=3), _run(pipe, seed=4))


def test_dynamic_routing_changes_the_image(pipe: MusarPipeline) -> None:
    on, off = _run(pipe, dynamic_routing=True), _run(pipe, dynamic_routing=False)
    assert not np.array_equal(on, off)
    # The backend changes only float rounding, not the result.
    assert np.abs(_run(pipe, attention="reference").astype(int) - on.astype(int)).max() <= 2


def test_independent_conditions_build_the_cache_once(pipe: MusarPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    # Cached == uncached is tested at the transformer level (tests/test_speed.py); here: the
    # pipeline builds the cache once per call, not once per step.
    calls = []
    build = pipe.transformer.build_condition_cache
    monkeypatch.setattr(pipe.transformer, "build_condition_cache", lambda *a, **k: calls.append(1) or build(*a, **k))
    cached = _run(pipe, independent_conditions=True, num_inference_steps=3)
    assert calls == [1]
    assert not np.array_equal(cached, _run(pipe, num_inference_steps=3))


def test_loads_from_a_local_folder(pipe: MusarPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "flux")
    loaded = MusarPipeline.from_pretrained(tmp_path / "flux")
    assert type(loaded.transformer).__name__ == "MusarTransformer"
    assert np.array_equal(_run(loaded), _run(pipe))
    with pytest.raises(MusarError, match="cannot load model"):
        MusarPipeline.from_pretrained(tmp_path / "nowhere")


def test_bad_calls_are_user_errors(pipe: MusarPipeline) -> None:
    with pytest.raises(MusarError, match="does not appear"):
        pipe("a dog", _refs(1), height=64, width=64, num_inference_steps=1, progress=False)
    with pytest.raises(MusarError, match="multiple of 16"):
        pipe(PROMPT, _refs(1), height=65, width=64, num_inference_steps=1, progress=False)
    with pytest.raises(MusarError, match="at least one subject"):
        pipe(PROMPT, [], height=64, width=64, num_inference_steps=1, progress=False)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "I", "F", "1"])
def test_reference_modes_become_rgb_squares(mode: str) -> None:
    im = Image.new(mode, (40, 20))
    ref = load_reference(im, 32)
    assert ref.mode == "RGB" and ref.size == (32, 32)


def test_reference_padding_keeps_aspect_and_exif_is_applied() -> None:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    padded = np.asarray(load_reference(im, 40))
    assert tuple(padded[0, 20]) == (255, 255, 255) and tuple(padded[20, 20]) == (255, 0, 0)
    cropped = np.asarray(load_reference(im, 40, "crop"))
    assert tuple(cropped[0, 20]) == (255, 0, 0)
    rotated = Image.new("RGB", (40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    rotated.info["exif"] = exif.tobytes()
    rotated = Image.open(_roundtrip_jpeg(rotated, exif))
    assert to_rgb(rotated).size == (20, 40)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert sixteen.mode == "I;16"
    assert np.asarray(to_rgb(sixteen)).min() == 255


def _roundtrip_jpeg(im: Image.Image, exif: Image.Exif):
    import io

    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    buf.seek(0)
    return buf
