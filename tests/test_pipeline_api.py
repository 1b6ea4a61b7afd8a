"""MusarPipeline as a diffusers user expects it: dtype on every component, a BaseOutput,
return_dict, callback_on_step_end, one generator per image, top-level import."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import BaseOutput
from PIL import Image

from musar.errors import MusarError
from musar.pipelines.pipeline_musar import MusarPipeline
from musar.pipelines.presets import tiny_pipeline

PROMPT = "a corgi and a red backpack on the beach"
SUBJECTS = [(Image.new("RGB", (40, 40), (200, 40, 40)), "a corgi"), (Image.new("RGB", (30, 50), (40, 200, 40)), "a red backpack")]
ARGS = {"height": 64, "width": 64, "num_inference_steps": 3, "condition_size": 32, "progress": False}
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def pipe() -> MusarPipeline:
    return tiny_pipeline()


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_dtype_reaches_every_component(pipe: MusarPipeline, tmp_path: Path, keyword: str) -> None:
    pipe.save_pretrained(tmp_path / "flux")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch_dtype is accepted without a deprecation
        loaded = MusarPipeline.from_pretrained(tmp_path / "flux", **{keyword: torch.bfloat16})
    for name in COMPONENTS:
        assert {p.dtype for p in getattr(loaded, name).parameters()} == {torch.bfloat16}, name
    with pytest.raises(MusarError, match="disagree"):
        MusarPipeline.from_pretrained(tmp_path / "flux", dtype=torch.bfloat16, torch_dtype=torch.float16)


def test_a_dtype_per_component(pipe: MusarPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "flux")
    # (fp16 for the others would keep T5's `wo` layers in float32, by transformers' own rule)
    loaded = MusarPipeline.from_pretrained(tmp_path / "flux", dtype={"transformer": torch.float16, "default": torch.bfloat16})
    assert {p.dtype for p in loaded.transformer.parameters()} == {torch.float16}
    for name in COMPONENTS[1:]:
        assert {p.dtype for p in getattr(loaded, name).parameters()} == {torch.bfloat16}, name


def test_output_is_a_base_output_and_return_dict_false_a_tuple(pipe: MusarPipeline) -> None:
    out = pipe(PROMPT, SUBJECTS, generator=torch.Generator().manual_seed(0), **ARGS)
    assert isinstance(out, BaseOutput) and out["images"] is out.images and out[0] is out.images
    tup = pipe(PROMPT, SUBJECTS, generator=torch.Generator().manual_seed(0), return_dict=False, **ARGS)
    assert isinstance(tup, tuple) and len(tup) == 1
    assert np.array_equal(np.asarray(tup[0][0]), np.asarray(out.images[0]))


def test_callback_on_step_end_sees_every_step_and_can_change_latents(pipe: MusarPipeline) -> None:
    seen: list[tuple[int, float, tuple[int, ...]]] = []

    def record(p: MusarPipeline, step: int, t: torch.Tensor, tensors: dict) -> dict:
        assert p is pipe and p.num_timesteps == 3 and set(tensors) == {"latents", "prompt_embeds"}
        seen.append((step, float(t), tuple(tensors["latents"].shape)))
        return {}

    plain = pipe(PROMPT, SUBJECTS, generator=torch.Generator().manual_seed(0), output_type="latent", **ARGS).images
    same = pipe(PROMPT, SUBJECTS, generator=torch.Generator().manual_seed(0), output_type="latent",
                callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **ARGS).images
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert seen[0][1] > seen[1][1] > seen[2][1]  # timesteps go down
    assert torch.equal(same, plain)  # a callback that changes nothing changes nothing

    def zero_last(p: MusarPipeline, step: int, t: torch.Tensor, tensors: dict) -> dict:
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    zeroed = pipe(PROMPT, SUBJECTS, generator=torch.Generator().manual_seed(0), output_type="latent",
                  callback_on_step_end=zero_last, **ARGS).images
    assert torch.count_nonzero(zeroed) == 0

    def stop_after_first(p: MusarPipeline, step: int, t: torch.Tensor, tensors: dict) -> dict:
        seen.append((step, 0.0, ()))
        p._interrupt = True
        return {}

    seen.clear()
    pipe(PROMPT, SUBJECTS, generator=torch.Generator().manual_seed(0), callback_on_step_end=stop_after_first, **ARGS)
    assert [s for s, _, _ in seen] == [0]
    with pytest.raises(MusarError, match="may name"):
        pipe(PROMPT, SUBJECTS, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"], **ARGS)


def test_one_generator_per_image(pipe: MusarPipeline) -> None:
    pair = pipe(PROMPT, SUBJECTS, num_images_per_prompt=2, output_type="latent",
                generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], **ARGS).images
    single = pipe(PROMPT, SUBJECTS, output_type="latent", generator=torch.Generator().manual_seed(6), **ARGS).images
    assert pair.shape[0] == 2 and not torch.equal(pair[0], pair[1])
    assert torch.allclose(pair[1], single[0], atol=1e-5)  # image k depends on generator k only
    with pytest.raises(MusarError, match="one per image"):
        pipe(PROMPT, SUBJECTS, num_images_per_prompt=2, generator=[torch.Generator()], **ARGS)


def test_top_level_import_is_the_pipeline() -> None:
    import musar

    assert musar.MusarPipeline is MusarPipeline
    assert issubclass(musar.MusarPipelineOutput, BaseOutput)


def test_offload_without_cuda_is_refused_before_any_weight_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import musar.pipelines.presets as presets

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: offload is allowed here")
    monkeypatch.setattr(presets, "get_preset", lambda name: pytest.fail("a model was built"))
    with pytest.raises(MusarError, match="--offload needs a CUDA GPU"):
        presets.load_pipeline(preset="tiny", offload="model")
