"""The rendered training pools of base pretraining: captioned scenes and two-panel images.

Rendering is cheap next to an optimizer step, so each pool is rendered once up front
(pretraining logs the render time). Every pool holds training-split identities only, so held-out
test identities stay unseen by the base as well as by MUSAR. A pool keeps the grounding targets of its samples (subject spans in
the caption and token labels from the masks) next to the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from musar.data.samples import another_phrase, diptych_prompt
from musar.toy import world
from musar.toy.grounding import GroundingTargets, diptych_targets, scene_targets

SAME = "the same"  # the right panel's phrase prefix when both panels show one identity


@dataclass
class Pool:
    """(N, 3, H, W) pixels in [-1, 1], their prompts and grounding targets."""

    pixels: torch.Tensor
    prompts: list[str]
    targets: GroundingTargets


def to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    pixels = np.stack(arrays).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def _flags(rng: np.random.Generator, n: int, p: float) -> list[bool]:
    return [bool(f) for f in rng.random(n) < p]


def scene_pool(
    n: int, seed: int, tokenizer: object, max_length: int, max_objects: int = 2, same_category_prob: float = 0.3,
    brief_prob: float = 0.5, background: bool = False,
) -> Pool:
    """Scenes of 1..``max_objects`` subjects, each named in full or, with ``brief_prob``, by its
    category only, so the base also knows what 'a star' means without a colour (the phrase MUSAR's
    prompts use)."""
    scenes = world.make_multi_scenes(n, seed, max_objects=max_objects, split="train", same_category_prob=same_category_prob)
    rng = np.random.default_rng(seed + 101)
    briefs = [_flags(rng, len(s.placements), brief_prob) for s in scenes]
    captions = [world.caption(s, b) for s, b in zip(scenes, briefs, strict=True)]
    targets = scene_targets(scenes, captions, briefs, tokenizer, max_length, background, subjects=max_objects)
    return Pool(to_tensor([world.render_array(s) for s in scenes]), captions, targets)


def diptych_pool(
    n: int, seed: int, tokenizer: object, max_length: int, brief_prob: float = 0.5, same_identity_prob: float = 0.5,
    background: bool = False,
) -> Pool:
    """(n, 3, 64, 128) two-panel images with the paper's template prompt (Fig. 2).

    Two kinds, drawn with ``same_identity_prob``:

    * *same identity* (the in-context identity prior, as FLUX drew Subjects200K): both panels
      show one subject in two scenes; the right panel is named briefly as 'the same <shape>', so
      its colours and pattern can only come from the left panel;
    * *two identities*, built the way :func:`musar.data.samples.make_diptych` builds MUSAR's
      diptychs (a repeated shape is 'another <shape>'), the shape MUSAR's stages 2-3 train at.
    """
    specs = world.make_pair_specs(2 * n, seed + 7, split="train")
    rng = np.random.default_rng(seed + 202)
    arrays, prompts, panels, phrases = [], [], [], []
    for a, b in zip(specs[0::2], specs[1::2], strict=True):
        brief_a, brief_b = _flags(rng, 2, brief_prob)
        phrase_a = world.subject_phrase(a.identity, brief=brief_a)
        if rng.random() < same_identity_prob:
            left, right = a.scenes
            phrase_b = f"{SAME} {a.identity.shape}"
            desc_b = world.caption(right, True).replace(f"a {a.identity.shape}", phrase_b, 1)
        else:
            left, right = a.scenes[1], b.scenes[1]
            phrase_b = world.subject_phrase(b.identity, brief=brief_b)
            if a.identity.category == b.identity.category:
                phrase_b = another_phrase(phrase_b)
            desc_b = world.caption(right, brief_b)
        prompts.append(diptych_prompt(phrase_a, world.caption(left, brief_a), phrase_b, desc_b))
        arrays.append(np.concatenate([world.render_array(left), world.render_array(right)], axis=1))
        panels.append((left, right))
        phrases.append((phrase_a, phrase_b))
    targets = diptych_targets(panels, prompts, phrases, tokenizer, max_length, background)
    return Pool(to_tensor(arrays), prompts, targets)

