"""A plain diffusers ``FluxPipeline`` driving ``MusarTransformer`` with no references gives the
images ``FluxTransformer2DModel`` gives on the same weights, bit for bit (issue 23, item 1).

This is the model contract at the pipeline level: FluxPipeline passes ``joint_attention_kwargs``,
``guidance``, ``txt_ids``/``img_ids`` and ``return_dict=False`` every step, so any forward of ours
that reads them differently shows up here as different pixels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from musar.models.transformer import MusarTransformer
from musar.pipelines.presets import tiny_pipeline


def _flux_pipeline(parts: dict, transformer: torch.nn.Module) -> FluxPipeline:
    return FluxPipeline(transformer=transformer, **parts).to(torch.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[FluxPipeline, FluxPipeline]:
    tiny = tiny_pipeline(seed=0)
    folder: Path = tmp_path_factory.mktemp("tiny") / "transformer"
    tiny.transformer.save_pretrained(folder)
    # The same saved folder loads as both classes: same config, same weight names.
    ours = MusarTransformer.from_pretrained(folder).eval()
    theirs = FluxTransformer2DModel.from_pretrained(folder).eval()
    parts = {k: getattr(tiny, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    return _flux_pipeline(parts, ours), _flux_pipeline(parts, theirs)


@pytest.mark.parametrize("scale", [None, 0.5])
def test_flux_pipeline_gives_the_same_image_with_either_transformer(pair: tuple[FluxPipeline, FluxPipeline],
                                                                    scale: float | None) -> None:
    kwargs = {"prompt": "a red dog on a beach", "height": 64, "width": 64, "num_inference_steps": 3,
              "guidance_scale": 3.5, "max_sequence_length": 32, "output_type": "pt"}
    if scale is not None:  # FluxPipeline hands the LoRA scale to the transformer in this dict
        kwargs["joint_attention_kwargs"] = {"scale": scale}
    images = []
    for pipe in pair:
        with torch.no_grad():
            images.append(pipe(**kwargs, generator=torch.Generator().manual_seed(7)).images)
    assert images[0].shape == (1, 3, 64, 64)
    assert images[0].std() > 0, "a constant image would make the comparison meaningless"
    assert torch.equal(images[0], images[1])


def test_musar_text_to_image_is_the_flux_pipeline_on_flux_weights(pair: tuple[FluxPipeline, FluxPipeline]) -> None:
    # MusarPipeline.text_to_image (the toy's text-only sampler) against FluxPipeline with
    # diffusers' own transformer, batched, one generator per image.
    from musar.pipelines.pipeline_musar import MusarPipeline

    ours, theirs = pair
    musar = MusarPipeline(**ours.components)
    kwargs = {"prompt": ["a red dog", "a blue cat on a sofa"], "height": 64, "width": 64, "num_inference_steps": 3,
              "max_sequence_length": 32, "output_type": "pt"}
    with torch.no_grad():
        a = musar.text_to_image(**kwargs, progress=False, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
        b = theirs(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert a.images.shape == (2, 3, 64, 64) and a.images.std() > 0
    assert torch.equal(a.images, b.images)
