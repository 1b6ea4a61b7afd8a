"""Probes of the toy base and of MUSAR on held-out identities: they generate, the analyser reads.

* :func:`text_to_image` (gate 0): the base from full captions, no references: does it draw the
  shape, body colour, pattern and pattern colour its caption names?
* :func:`grounding` (gate 1): the base's own S* (no LoRA, no references) in text-only generation
  of two-subject scenes, as routing accuracy per layer over the late half of the steps.
* :func:`pooled_shortcut`: captions' sequence embeddings with another caption's pooled vector;
  which caption does each attribute follow?
* :func:`customization` (gates 2 and 3): MUSAR with references on brief prompts, where the
  identity can only come from the references; also the routing accuracy of what it routed.

Every function returns plain dicts of (mean, standard error) pairs from :mod:`musar.toy.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from musar.pipelines.pipeline_musar import MusarPipeline
from musar.toy.analyser import ATTRIBUTES, Verdict, evaluate
from musar.toy.cases import Case, generate_case, layout_boxes
from musar.toy.metrics import (
    attribute_rates,
    entanglement,
    late_steps,
    mean_se,
    routing_accuracy,
    scene_token_labels,
)
from musar.toy.sampling import STEPS, TEXT_LENGTH, AffinityTap, sample_text_only, tapped
from musar.utils.spans import find_subject_spans, spans_tensor

Rates = dict[str, tuple[float, float]]


def _expand(cases: Sequence[Case], seeds: Sequence[int]) -> tuple[list[Case], list[int]]:
    return [c for c in cases for _ in seeds], [s for _ in cases for s in seeds]


def text_to_image(
    pipe: MusarPipeline, cases: Sequence[Case], seeds: Sequence[int], brief: bool = False
) -> tuple[Rates, list[Verdict], list[Image.Image]]:
    """The base from each case's caption (full unless ``brief``), scored against the scene."""
    flat, flat_seeds = _expand(cases, seeds)
    prompts = [c.prompt if brief else c.full_prompt for c in flat]
    images = sample_text_only(pipe, prompts, flat_seeds)
    verdicts = [evaluate(im, c.identities, c.scene) for im, c in zip(images, flat, strict=True)]
    return attribute_rates(verdicts), verdicts, images


def _spans(pipe: MusarPipeline, prompts: Sequence[str], phrases: Sequence[Sequence[str]]) -> torch.Tensor:
    found = [find_subject_spans(p, ph, pipe.tokenizer_2, TEXT_LENGTH) for p, ph in zip(prompts, phrases, strict=True)]
    return spans_tensor(found)


def _per_image_accuracy(routes: np.ndarray, labels: np.ndarray, steps: Sequence[int]) -> dict[str, np.ndarray]:
    """routes (steps, layers, B, n), labels (B, n) -> per-image accuracy pooled over the late
    ``steps`` and all layers ('all'), and per layer ('L0', 'L1', ...)."""
    late = routes[list(steps)]
    out = {"all": np.array([routing_accuracy(late[:, :, b], labels[b]) for b in range(labels.shape[0])])}
    for layer in range(routes.shape[1]):
        out[f"L{layer}"] = np.array([routing_accuracy(late[:, layer, b], labels[b]) for b in range(labels.shape[0])])
    return out


def _split_rates(per_image: dict[str, np.ndarray], same: np.ndarray) -> Rates:
    out: Rates = {}
    for key, acc in per_image.items():
        out[key] = mean_se(acc)
        out[f"{key}_same"] = mean_se(acc[same])
        out[f"{key}_different"] = mean_se(acc[~same])
    return out


def grounding(
    pipe: MusarPipeline, cases: Sequence[Case], seeds: Sequence[int], brief: bool = True, steps: int = STEPS
) -> Rates:
    """Routing accuracy of the base's own S* in text-only generation of the cases' prompts.

    ``brief``: the MUSAR test prompt ('a diamond on the left and another diamond on the right')
    with phrases 'diamond' / 'another diamond'; else the full caption with full phrases. Token
    labels come from the prompted scene's masks. Keys: 'all', 'L<i>' per layer, each also with
    '_same' / '_different' (shape) suffixes; errors are over images.
    """
    flat, flat_seeds = _expand(cases, seeds)
    prompts = [c.prompt if brief else c.full_prompt for c in flat]
    phrases = [c.phrases if brief else c.full_phrases for c in flat]
    tap = AffinityTap()
    with tapped(pipe.transformer, tap):
        sample_text_only(pipe, prompts, flat_seeds, steps=steps, tap=tap, spans=_spans(pipe, prompts, phrases))
    labels = np.stack([scene_token_labels(c.scene) for c in flat])
    per_image = _per_image_accuracy(tap.all_routes(), labels, late_steps(steps))
    return _split_rates(per_image, np.array([c.same_category for c in flat]))


def pooled_shortcut(pipe: MusarPipeline, cases: Sequence[Case], seeds: Sequence[int]) -> Rates:
    """Sequence embeddings of case i's full caption, pooled vector of case i+1's.

    For each attribute (and the background), among subjects where the two captions differ in it:
    the share drawn as the sequence's caption says ('<attr>_seq') and as the pooled one says
    ('<attr>_pooled'). A base that reads its sequence has seq near 1 and pooled near 0.
    """
    flat, flat_seeds = _expand(cases, seeds)
    other = flat[1:] + flat[:1]
    images = sample_text_only(pipe, [c.full_prompt for c in flat], flat_seeds,
                              pooled_prompts=[c.full_prompt for c in other])
    out: Rates = {}
    seq_hits: dict[str, list[bool]] = {a: [] for a in (*ATTRIBUTES, "background")}
    pool_hits: dict[str, list[bool]] = {a: [] for a in (*ATTRIBUTES, "background")}
    for im, a, b in zip(images, flat, other, strict=True):
        if len(a.identities) != len(b.identities):
            continue
        va, vb = evaluate(im, a.identities, a.scene), evaluate(im, b.identities, b.scene)
        for k, attr in enumerate(ATTRIBUTES):
            for sa, sb in zip(va.subjects, vb.subjects, strict=True):
                if getattr(sa.reference, attr) != getattr(sb.reference, attr):
                    seq_hits[attr].append(sa.matches[k])
                    pool_hits[attr].append(sb.matches[k])
        if a.scene.background != b.scene.background:
            seq_hits["background"].append(bool(va.background_ok))
            pool_hits["background"].append(bool(vb.background_ok))
    for attr in seq_hits:
        out[f"{attr}_seq"] = mean_se(seq_hits[attr])
        out[f"{attr}_pooled"] = mean_se(pool_hits[attr])
    return out


def customization(
    pipe: MusarPipeline, cases: Sequence[Case], seeds: Sequence[int], static_routing: bool = True,
    dynamic_routing: bool = True, routes_from: str = "routing",
) -> tuple[Rates, list[Verdict], list[Image.Image]]:
    """MUSAR generation of the cases (brief prompts + references), scored against the references.

    With two or more subjects also the routing accuracy of the S* MUSAR computed from its own q/k
    in every layer ('routing_all', 'routing_L<i>', with '_same'/'_different'), and entanglement.
    ``routes_from``: ``"routing"`` (S*, the method) or ``"layout"``: boxes around each subject's
    true tokens (:func:`~musar.toy.cases.layout_boxes`, the layout-control feature), the upper
    bound of what routing can give; the routing accuracy then measures the routes taken.
    """
    if routes_from not in ("routing", "layout"):
        raise ValueError(f"routes_from must be 'routing' or 'layout', not {routes_from!r}")
    tap = AffinityTap()
    images: list[Image.Image] = []
    verdicts: list[Verdict] = []
    multi = len(cases[0].identities) >= 2
    with tapped(pipe.transformer, tap):
        for case in cases:
            for s in seeds:
                tap.records = {}
                boxes = layout_boxes(case) if routes_from == "layout" else None
                imgs, _ = generate_case(pipe, case, (s,), static_routing, dynamic_routing, boxes=boxes)
                tap.flush()
                images.extend(imgs)
                verdicts.append(evaluate(imgs[0], case.identities, case.scene))
    rates = attribute_rates(verdicts)
    if multi:
        rates["entanglement"] = entanglement(verdicts)
        same = np.array([c.same_category for c in cases for _ in seeds])
        rates["entanglement_same"] = entanglement([v for v, s in zip(verdicts, same, strict=True) if s])
        if tap.batches:
            labels = np.stack([scene_token_labels(c.scene) for c in cases for _ in seeds])
            per_image = _per_image_accuracy(tap.all_routes(), labels, late_steps(STEPS))
            rates.update({f"routing_{k}": v for k, v in _split_rates(per_image, same).items()})
    return rates, verdicts, images


def identity_prior(pipe: MusarPipeline, cases: Sequence[Case], seeds: Sequence[int]) -> Rates:
    """The in-context identity prior: two-panel text-only generation where the left panel names a
    held-out subject in full and the right panel only says 'the same <shape>'.

    Keys per attribute: '<attr>_left' (the left panel follows its words) and '<attr>_copied' (the
    right panel shows what the left panel *drew*, among right panels with an object); also
    'identity_copied' (all four attributes) and 'brief_<attr>' from the right panel vs the truth.
    """
    from musar.data.samples import diptych_prompt
    from musar.toy import world
    from musar.toy.pools import SAME

    flat, flat_seeds = _expand(cases, seeds)
    prompts = []
    for c in flat:
        ident = c.identities[0]
        left, right = c.scene, c.references[0]
        phrase_b = f"{SAME} {ident.shape}"
        desc_b = world.caption(right, True).replace(f"a {ident.shape}", phrase_b, 1)
        prompts.append(diptych_prompt(world.subject_phrase(ident), world.caption(left), phrase_b, desc_b))
    images = sample_text_only(pipe, prompts, flat_seeds, width=128)
    hits: dict[str, list[bool]] = {}
    for im, c in zip(images, flat, strict=True):
        left_img, right_img = im.crop((0, 0, 64, 64)), im.crop((64, 0, 128, 64))
        vl = evaluate(left_img, c.identities, c.scene)
        vr = evaluate(right_img, c.identities, c.references[0])
        drawn = vl.subjects[0].detected
        other = vr.subjects[0].detected
        for k, attr in enumerate(ATTRIBUTES):
            hits.setdefault(f"{attr}_left", []).append(vl.subjects[0].matches[k])
            hits.setdefault(f"brief_{attr}", []).append(vr.subjects[0].matches[k])
            if drawn is not None and other is not None:
                hits.setdefault(f"{attr}_copied", []).append(drawn.attributes()[attr] == other.attributes()[attr])
        if drawn is not None and other is not None:
            hits.setdefault("identity_copied", []).append(drawn.attributes() == other.attributes())
    return {k: mean_se(v) for k, v in hits.items()}
