"""Held-out two-subject test cases and how to generate them (issue 8, items 3 and 5).

A case is two *test-split* identities (never seen in base pretraining or MUSAR training), a target
scene holding both (its caption is the prompt, its background and regions the prompt fidelity
targets) and one single-subject reference render of each in a different scene. Half the cases
pair two subjects of one shape, the case where attributes leak most easily.

The prompt names subjects by category only, as DreamBench prompts do ("a diamond on the left and
another diamond on the right, on a white background"), with the phrases "diamond" and "another
diamond". Colours and patterns can then come only from the reference images. With full phrases
a good text-to-image base would need no references at all, and the comparison would measure the
prompt, not the conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from musar.pipelines.pipeline_musar import MusarPipeline
from musar.toy import world
from musar.toy.world import Identity, Scene

IMAGE_SIZE = 64
GEN_DEFAULTS = {"num_inference_steps": 16, "condition_size": 64, "phrase_tokens": 8, "max_sequence_length": 64}


@dataclass(frozen=True)
class Case:
    index: int
    identities: tuple[Identity, Identity]
    scene: Scene  # the prompted target scene
    references: tuple[Scene, Scene]  # one single-subject scene per identity
    same_category: bool

    @property
    def prompt(self) -> str:
        return world.caption(self.scene, brief=True)

    @property
    def phrases(self) -> tuple[str, str]:
        a, b = (world.subject_phrase(i, brief=True) for i in self.identities)
        return a, f"another {b}" if self.same_category else b

    def reference_images(self) -> list[Image.Image]:
        return [world.render_scene(s) for s in self.references]


def _compatible(a: Identity, b: Identity) -> bool:
    free = set(world.BACKGROUNDS) - a.colours - b.colours
    return a != b and bool(free)


def make_cases(n: int, seed: int = 1234, size: int = IMAGE_SIZE) -> list[Case]:
    """``n`` deterministic held-out cases; even indices pair one shape, odd ones two shapes."""
    cases: list[Case] = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        same = i % 2 == 0
        while True:
            a = world.sample_identity(rng, "test")
            b = world.sample_identity(rng, "test")
            if _compatible(a, b) and (a.shape == b.shape) == same:
                break
        scene = world.sample_scene(rng, [a, b], size)
        refs = tuple(world.sample_scene(rng, [x], size) for x in (a, b))
        cases.append(Case(i, (a, b), scene, refs, same))  # type: ignore[arg-type]
    return cases


def generate_case(
    pipe: MusarPipeline, case: Case, seeds: tuple[int, ...], static_routing: bool = True, dynamic_routing: bool = True,
    return_routing: bool = False, references: list[Image.Image] | None = None,
) -> tuple[list[Image.Image], object]:
    """One image per seed for ``case`` with MUSAR conditioning (references + phrases); the
    references default to the case's own renders."""
    images, routing = [], None
    refs = references if references is not None else case.reference_images()
    for s in seeds:
        out = pipe(
            case.prompt, list(zip(refs, case.phrases, strict=True)), height=IMAGE_SIZE,
            width=IMAGE_SIZE, generator=torch.Generator().manual_seed(s), static_routing=static_routing,
            dynamic_routing=dynamic_routing, attention="fast", return_routing=return_routing, progress=False,
            **GEN_DEFAULTS,  # type: ignore[arg-type]
        )
        images.extend(out.images)
        routing = routing or out
    return images, routing


@torch.no_grad()
def generate_text_only(pipe: MusarPipeline, prompt: str, seed: int) -> Image.Image:
    """The base model from the prompt alone (no references, no LoRA use): the Euler sampler of
    MusarPipeline without conditions, for the 'base' row of the report."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    steps, length = GEN_DEFAULTS["num_inference_steps"], GEN_DEFAULTS["max_sequence_length"]
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device="cpu", max_sequence_length=length)
    latents, ids = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, IMAGE_SIZE, IMAGE_SIZE,
                                        embeds.dtype, "cpu", torch.Generator().manual_seed(seed))
    sched = pipe.scheduler.config
    mu = calculate_shift(latents.shape[1], sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096),
                         sched.get("base_shift", 0.5), sched.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    pipe.scheduler.set_begin_index(0)
    for t in timesteps:
        v = pipe.transformer(hidden_states=latents, encoder_hidden_states=embeds, pooled_projections=pooled,
                             timestep=(t / 1000).expand(1), img_ids=ids, txt_ids=text_ids).sample
        latents = pipe.scheduler.step(v, t, latents, return_dict=False)[0]
    unpacked = pipe._unpack_latents(latents, IMAGE_SIZE, IMAGE_SIZE, pipe.vae_scale_factor)
    unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    return pipe.image_processor.postprocess(pipe.vae.decode(unpacked, return_dict=False)[0], output_type="pil")[0]
