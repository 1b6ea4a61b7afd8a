"""One image path: training turns images into pixels exactly as the pipeline does at inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from musar.data.batches import BatchTransform, to_tensor
from musar.data.samples import Sample
from musar.pipelines.presets import tiny_pipeline
from musar.utils.images import load_reference


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def processor():
    return tiny_pipeline().image_processor  # FluxPipeline's own VaeImageProcessor


@pytest.mark.parametrize(("source", "size"), [((50, 37), (64, 48)), ((97, 97), (32, 32)), ((64, 32), (64, 32))])
def test_training_pixels_are_the_pipelines_pixels(processor, source: tuple[int, int], size: tuple[int, int]) -> None:
    image = _noise_image(*source)
    expected = processor.preprocess(image, height=size[1], width=size[0])[0]
    assert torch.equal(to_tensor(image, size), expected)


def test_a_reference_is_the_same_tensor_in_training_and_inference(processor) -> None:
    reference, target = _noise_image(80, 80, seed=1), _noise_image(96, 48, seed=2)
    sample = Sample(target=target, references=[reference], prompt="a corgi", phrases=["a corgi"])
    trained = BatchTransform(view_size=32, condition_size=32)(sample).references[0]
    inferred = processor.preprocess(load_reference(reference, 32), height=32, width=32)[0]
    assert torch.equal(trained, inferred)
    # and the filter is Lanczos (diffusers' default), not the bicubic training used before
    bicubic = np.asarray(reference.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1
    assert not np.allclose(trained.permute(1, 2, 0).numpy(), bicubic, atol=1e-3)
