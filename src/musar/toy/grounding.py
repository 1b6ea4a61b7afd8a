"""The grounding term of toy *base pretraining*: the toy's stand-in for what FLUX gets from scale.

FLUX's noise tokens attend to the words of the subject they depict; dynamic routing relies on it
(docs/design.md sec. 9a). A 4M-parameter base trained for minutes does not learn that by itself (notes:
routing accuracy 0.43 without this term, 1.00 with it). So base pretraining adds, on samples with
two or more subjects (every sample, with the background phrase as a candidate):

    in every attention layer, S* = the head-mean softmax of NOISE queries over the main-prompt
    keys (q/k exactly as attention uses them), averaged over each subject phrase's tokens, exactly
    as dynamic routing computes it; normalised over the subjects; cross-entropy against the
    subject whose shape mask covers at least half of the token (other tokens are ignored).

Phrases are those the caption uses ('diamond' and 'another diamond', or the full 'red diamond
with blue dots'), so the text encoder must also tell 'diamond' from 'another diamond' by their
context ('on the left' / 'on the right'). This term is used in base pretraining only: never in
MUSAR training and never at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from musar.toy.metrics import subject_masks, token_labels
from musar.toy.world import Scene, subject_phrase
from musar.utils.spans import find_subject_spans


@dataclass
class GroundingTargets:
    """Per pool sample: (c, 2) spans, (n,) token labels, whether the sample takes part, and which
    of its c span slots are real (samples of one pool may name fewer phrases than c)."""

    spans: torch.Tensor  # (N, c, 2) int64
    labels: torch.Tensor  # (N, n) int64, -1 = ignored
    valid: torch.Tensor  # (N,) bool
    span_valid: torch.Tensor | None = None  # (N, c) bool; None = all real

    def take(self, idx: torch.Tensor) -> GroundingTargets:
        sv = None if self.span_valid is None else self.span_valid[idx]
        return GroundingTargets(self.spans[idx], self.labels[idx], self.valid[idx], sv)


def caption_phrases(scene: Scene, brief: Sequence[bool]) -> list[str]:
    """The phrase the caption (:func:`musar.toy.world.caption`) uses for each subject."""
    seen: set[str] = set()
    out = []
    for p, short in zip(scene.placements, brief, strict=True):
        if short and p.identity.shape in seen:
            out.append(f"another {p.identity.shape}")
        else:
            out.append(subject_phrase(p.identity, brief=short))
        seen.add(p.identity.shape)
    return out


def background_phrase(scene: Scene) -> str:
    """The caption's words naming the background colour ('gray background')."""
    return f"{scene.background} background"


def background_labels(masks: Sequence[np.ndarray], token_px: int = 8) -> np.ndarray:
    """Tokens with no subject pixel at all (pure background), as a boolean (n,) array."""
    union = np.logical_or.reduce(list(masks))
    h, w = union.shape
    return ~union.reshape(h // token_px, token_px, w // token_px, token_px).any(axis=(1, 3)).ravel()


def scene_targets(
    scenes: Sequence[Scene], captions: Sequence[str], briefs: Sequence[Sequence[bool]], tokenizer: object,
    max_length: int, background: bool = False, subjects: int = 2,
) -> GroundingTargets:
    """Targets for a pool of scenes: spans of the subject phrases (slots 0..subjects-1) and, with
    ``background``, of the background phrase (last slot), whose label goes to pure-background tokens.

    Without ``background`` only scenes of exactly ``subjects`` subjects take part; with it every
    scene does (a lone subject still competes with the background for its tokens).
    """
    c = subjects + int(background)
    n_tokens = (scenes[0].size // 8) ** 2
    spans = torch.zeros(len(scenes), c, 2, dtype=torch.long)
    spans[..., 1] = 1
    labels = torch.full((len(scenes), n_tokens), -1, dtype=torch.long)
    valid = torch.zeros(len(scenes), dtype=torch.bool)
    span_valid = torch.zeros(len(scenes), c, dtype=torch.bool)
    for i, (scene, cap, brief) in enumerate(zip(scenes, captions, briefs, strict=True)):
        k = len(scene.placements)
        if k > subjects or (not background and k != subjects):
            continue
        phrases = caption_phrases(scene, brief) + ([background_phrase(scene)] if background else [])
        found = find_subject_spans(cap, phrases, tokenizer, max_length)
        slots = list(range(k)) + ([c - 1] if background else [])
        spans[i, slots] = torch.tensor(found)
        span_valid[i, slots] = True
        masks = subject_masks(scene)
        lab = torch.from_numpy(token_labels(masks))
        if background:
            lab[torch.from_numpy(background_labels(masks))] = c - 1
        labels[i] = lab
        valid[i] = True
    return GroundingTargets(spans, labels, valid, span_valid)


def diptych_targets(
    panels: Sequence[tuple[Scene, Scene]], prompts: Sequence[str], phrases: Sequence[tuple[str, str]],
    tokenizer: object, max_length: int, background: bool = False,
) -> GroundingTargets:
    """Targets for 128x64 two-panel images: the left panel's subject is 0, the right one's 1;
    with ``background`` each panel's background phrase is 2 (left) or 3 (right)."""
    out_spans, out_labels = [], []
    for (left, right), prompt, pair in zip(panels, prompts, phrases, strict=True):
        names = list(pair) + ([background_phrase(left), background_phrase(right)] if background else [])
        out_spans.append(find_subject_spans(prompt, names, tokenizer, max_length))
        lm, rm = subject_masks(left)[0], subject_masks(right)[0]
        blank = np.zeros_like(lm)
        masks = [np.concatenate([lm, blank], axis=1), np.concatenate([blank, rm], axis=1)]
        lab = token_labels(masks)
        if background:
            pure = background_labels(masks).reshape(lm.shape[0] // 8, -1)
            side = np.zeros_like(pure, dtype=np.int64)
            side[:, pure.shape[1] // 2 :] = 1
            lab = np.where(pure.ravel(), 2 + side.ravel(), lab)
        out_labels.append(lab)
    return GroundingTargets(
        torch.tensor(out_spans, dtype=torch.long), torch.from_numpy(np.stack(out_labels)),
        torch.ones(len(prompts), dtype=torch.bool),
    )


def grounding_loss(affinities: Sequence[torch.Tensor], targets: GroundingTargets) -> torch.Tensor | None:
    """Mean over layers of the cross-entropy of subject-normalised S* (B, n, c) against labels.

    Returns None when no token of the batch belongs to a subject of a taking-part sample.
    """
    keep = targets.labels.ge(0) & targets.valid[:, None]
    if not keep.any() or not affinities:
        return None
    losses = []
    for aff in affinities:
        if targets.span_valid is not None:  # padding slots take no share
            aff = aff * targets.span_valid[:, None, :].to(aff.dtype)
        share = aff / aff.sum(-1, keepdim=True).clamp_min(1e-12)
        picked = share.gather(-1, targets.labels.clamp_min(0)[..., None])[..., 0]
        losses.append(-(picked.clamp_min(1e-12).log()[keep]).mean())
    return torch.stack(losses).mean()
