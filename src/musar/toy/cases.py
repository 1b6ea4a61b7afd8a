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
    identities: tuple[Identity, ...]
    scene: Scene  # the prompted target scene
    references: tuple[Scene, ...]  # one single-subject scene per identity
    same_category: bool  # some shape occurs twice

    @property
    def prompt(self) -> str:
        return world.caption(self.scene, brief=True)

    @property
    def full_prompt(self) -> str:
        """The caption naming every subject in full (gate 0: what the base must draw from words)."""
        return world.caption(self.scene, brief=False)

    @property
    def phrases(self) -> tuple[str, ...]:
        """The brief phrases as the caption writes them: a repeated shape is 'another <shape>'."""
        seen: set[str] = set()
        out = []
        for ident in self.identities:
            out.append(f"another {ident.shape}" if ident.shape in seen else ident.shape)
            seen.add(ident.shape)
        return tuple(out)

    @property
    def full_phrases(self) -> tuple[str, ...]:
        return tuple(world.subject_phrase(i) for i in self.identities)

    def reference_images(self) -> list[Image.Image]:
        return [world.render_scene(s) for s in self.references]


def _compatible(a: Identity, b: Identity) -> bool:
    free = set(world.BACKGROUNDS) - a.colours - b.colours
    return a != b and bool(free)


def make_cases(n: int, seed: int = 1234, size: int = IMAGE_SIZE, subjects: int = 2) -> list[Case]:
    """``n`` deterministic held-out cases of ``subjects`` (1-4) test-split identities.

    Two subjects: even indices pair one shape, odd ones two shapes. Three and four: even indices
    repeat a shape (the first two share it), the others are all different. One: a single subject
    and its reference. Case i depends only on (seed, i, subjects): ``make_cases(8)`` is a prefix
    of ``make_cases(24)``.
    """
    if subjects not in world.LAYOUTS:
        raise ValueError(f"a case holds 1 to {max(world.LAYOUTS)} subjects, not {subjects}")
    cases: list[Case] = []
    for i in range(n):
        if subjects == 2:
            rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        else:  # other counts draw from their own streams, so the two-subject cases never change
            rng = np.random.default_rng(np.random.SeedSequence([seed, i, subjects]))
        same = i % 2 == 0 and subjects >= 2
        idents = _draw(rng, subjects, same)
        scene = world.sample_scene(rng, idents, size)
        refs = tuple(world.sample_scene(rng, [x], size) for x in idents)
        cases.append(Case(i, tuple(idents), scene, refs, same))
    return cases


def _draw(rng: np.random.Generator, count: int, same: bool) -> list[Identity]:
    if count == 1:
        return [world.sample_identity(rng, "test")]
    while True:
        a = world.sample_identity(rng, "test")
        b = world.sample_identity(rng, "test")
        if _compatible(a, b) and (a.shape == b.shape) == same:
            break
    idents = [a, b]
    while len(idents) < count:
        c = world.sample_identity(rng, "test")
        used = set().union(*(x.colours for x in idents), c.colours)
        if c not in idents and c.shape not in {x.shape for x in idents} and set(world.BACKGROUNDS) - used:
            idents.append(c)
    return idents


def generate_case(
    pipe: MusarPipeline, case: Case, seeds: tuple[int, ...], static_routing: bool = True, dynamic_routing: bool = True,
    return_routing: bool = False, references: list[Image.Image] | None = None,
    boxes: list[tuple[float, float, float, float]] | None = None,
) -> tuple[list[Image.Image], object]:
    """One image per seed for ``case`` with MUSAR conditioning (references + phrases); the
    references default to the case's own renders. ``boxes``: layout control, one per subject."""
    images, routing = [], None
    refs = references if references is not None else case.reference_images()
    for s in seeds:
        out = pipe(
            case.prompt, list(zip(refs, case.phrases, strict=True)), height=IMAGE_SIZE,
            width=IMAGE_SIZE, generator=torch.Generator().manual_seed(s), static_routing=static_routing,
            dynamic_routing=dynamic_routing, attention="fast", return_routing=return_routing, progress=False, boxes=boxes,
            **GEN_DEFAULTS,  # type: ignore[arg-type]
        )
        images.extend(out.images)
        routing = routing or out
    return images, routing


def generate_text_only(pipe: MusarPipeline, prompt: str, seed: int) -> Image.Image:
    """The base model from the prompt alone (no references, no LoRA use), for the 'base' row."""
    from musar.toy.sampling import sample_text_only

    return sample_text_only(pipe, [prompt], [seed])[0]


def layout_boxes(case: Case, token_px: int = 8) -> list[tuple[float, float, float, float]]:
    """Each subject's true place in the prompted scene as a box (fractions of the image): the
    token cells its shape covers, so boxes given from these route every subject token right."""
    from musar.toy.metrics import scene_token_labels

    labels = scene_token_labels(case.scene, token_px)
    side = round(len(labels) ** 0.5)
    grid = labels.reshape(side, side)
    boxes = []
    for k in range(len(case.identities)):
        rows, cols = np.nonzero(grid == k)
        if len(rows) == 0:
            raise ValueError(f"subject {k} of the case covers no whole token")
        boxes.append((cols.min() / side, rows.min() / side, (cols.max() + 1) / side, (rows.max() + 1) / side))
    return boxes
