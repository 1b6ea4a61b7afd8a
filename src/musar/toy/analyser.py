"""Score toy-world generations against their references and prompt scenes (issue 8, item 4).

Each image is read by :func:`musar.toy.detection.analyse` (re-exported here with the reader's other
public names); :func:`evaluate` assigns the detected objects to the references and records, per
subject, which attributes match and which leaked from another subject; :func:`summarize` turns
verdicts into rates.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from musar.toy.detection import (  # noqa: F401  (re-exported: callers import the reader from here)
    NOISY_SIGMA,
    Analysis,
    DetectedObject,
    analyse,
    classify_pixels,
    label_components,
)
from musar.toy.world import Identity, Scene, subject_phrase, where

ATTRIBUTES: tuple[str, ...] = ("shape", "body_colour", "pattern", "pattern_colour")


def _ref_attrs(identity: Identity) -> dict[str, str | None]:
    return {a: getattr(identity, a) for a in ATTRIBUTES}


@dataclass(frozen=True)
class SubjectVerdict:
    """How one reference subject came out in a generated image.

    ``detected`` is the object assigned to it (None if there was none to assign); ``matches`` holds
    one bool per :data:`ATTRIBUTES`; ``leaks`` names the attributes in which the object shows another
    reference's value where this reference's own value differs; ``eligible`` counts the attributes
    where some other reference differs from this one (the denominator for leaks).
    """

    reference: Identity
    detected: DetectedObject | None
    matches: tuple[bool, ...]
    leaks: tuple[str, ...]
    eligible: int
    region_ok: bool | None

    @property
    def present(self) -> bool:
        """Shape and body colour both right: the subject is recognisably there."""
        return self.detected is not None and self.matches[0] and self.matches[1]

    @property
    def fidelity(self) -> float:
        """Fraction of the four attributes that match the reference (0 when nothing was assigned)."""
        return sum(self.matches) / len(ATTRIBUTES)


@dataclass(frozen=True)
class Verdict:
    """Scores of one generated image against its references and its prompt scene."""

    analysis: Analysis
    subjects: tuple[SubjectVerdict, ...]
    prompt_background: str | None = None

    @property
    def background_ok(self) -> bool | None:
        """Whether the background matches the prompt scene's (None without a prompt scene)."""
        return None if self.prompt_background is None else self.analysis.background == self.prompt_background

    @property
    def all_present(self) -> bool:
        return all(s.present for s in self.subjects)

    @property
    def leaks(self) -> int:
        return sum(len(s.leaks) for s in self.subjects)

    @property
    def eligible(self) -> int:
        return sum(s.eligible for s in self.subjects)

    def describe(self) -> str:
        """The verdict for people: one line for the background, one per reference subject."""
        ground = f"background: {self.analysis.background}"
        if self.prompt_background is not None:
            ground += " (as prompted)" if self.background_ok else f" (prompted: {self.prompt_background})"
        lines = [ground]
        for s in self.subjects:
            o = s.detected
            seen = "nothing" if o is None else f"a {object_phrase(o)} {where(o.region)}"
            leak = f"; leaked from the other subject: {', '.join(s.leaks)}" if s.leaks else ""
            lines.append(
                f"{subject_phrase(s.reference, article=True)}: saw {seen}; fidelity {s.fidelity:.2f}{leak}"
            )
        return "\n".join(lines)


def object_phrase(o: DetectedObject) -> str:
    """'red diamond with blue dots': how a caption would name what was detected."""
    pattern = "" if o.pattern == "plain" else f" with {o.pattern_colour} {o.pattern}"
    return f"{o.body_colour} {o.shape}{pattern}"


def evaluate(
    image: Image.Image | np.ndarray | Analysis,
    references: Sequence[Identity],
    scene: Scene | None = None,
    max_objects: int = 8,
) -> Verdict:
    """Score an image generated from ``references`` (and a prompt described by ``scene``).

    Detected objects are assigned one-to-one to references so as to maximise, in this order, the
    total number of matching attributes, the number of objects in the region the prompt asked for,
    and the assigned area; a reference may stay unassigned when objects run out. ``scene``'s
    placements, if there are as many as references, give the prompted region of each reference in
    order, and its background the prompted background. Only the ``max_objects`` largest objects
    compete, which keeps the exhaustive assignment small.
    """
    analysis = image if isinstance(image, Analysis) else analyse(image)
    objs = list(analysis.objects[:max_objects])
    n = len(references)
    regions: list[str | None] = [None] * n
    if scene is not None and len(scene.placements) == n:
        regions = [p.region for p in scene.placements]
    refs = [_ref_attrs(r) for r in references]

    def matches(i: int, o: DetectedObject | None) -> tuple[bool, ...]:
        got = o.attributes() if o is not None else {}
        return tuple(o is not None and got[a] == refs[i][a] for a in ATTRIBUTES)

    best: tuple[tuple[int, int, int], tuple[DetectedObject | None, ...]] | None = None
    for perm in itertools.permutations(range(len(objs) + n), n):
        chosen = tuple(objs[k] if k < len(objs) else None for k in perm)
        if any(c is None for c in chosen) and len([c for c in chosen if c is not None]) < min(n, len(objs)):
            continue  # leave a reference empty only when every object is taken
        key = (
            sum(sum(matches(i, o)) for i, o in enumerate(chosen)),
            sum(o is not None and o.region == regions[i] for i, o in enumerate(chosen)),
            sum(o.area for o in chosen if o is not None),
        )
        if best is None or key > best[0]:
            best = (key, chosen)
    assigned = best[1] if best is not None else (None,) * n

    subjects = []
    for i, o in enumerate(assigned):
        # Values of this attribute held by other references but not by this one: seeing one of
        # them on this subject's object is a leak from another subject.
        foreign = {a: {r[a] for j, r in enumerate(refs) if j != i} - {refs[i][a]} for a in ATTRIBUTES}
        eligible = sum(bool(v) for v in foreign.values()) if o is not None else 0
        leaks = tuple(a for a in ATTRIBUTES if o is not None and o.attributes()[a] in foreign[a])
        region_ok = None if o is None or regions[i] is None else o.region == regions[i]
        subjects.append(SubjectVerdict(references[i], o, matches(i, o), leaks, eligible, region_ok))
    return Verdict(analysis, tuple(subjects), None if scene is None else scene.background)


def summarize(verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Aggregate metrics over images (NaN where a metric has nothing to count).

    * ``all_present_rate`` (the both-subjects-present rate for two references): share of images
      where every reference is present (assigned object with the right shape and body colour).
    * ``attribute_fidelity``: mean over all reference subjects of the share of the four attributes
      (shape, body colour, pattern, pattern colour) its assigned object matches; ``fidelity_<attr>``
      is the same per attribute.
    * ``entanglement_rate``: leaked attributes / eligible attributes, summed over all subjects of all
      images; an attribute of subject A is eligible when another reference differs from A in it, and
      leaked when A's object shows another reference's value. ``entangled_image_rate``: share of
      images (with anything eligible) that have at least one leak.
    * ``background_rate`` and ``region_rate``: prompt fidelity, the share of images whose background
      and of assigned subjects whose region match the prompt scene.
    """
    subs = [s for v in verdicts for s in v.subjects]
    nan = float("nan")

    def mean(xs: Sequence[float]) -> float:
        return float(np.mean(xs)) if len(xs) else nan

    out = {
        "images": float(len(verdicts)),
        "all_present_rate": mean([v.all_present for v in verdicts]),
        "attribute_fidelity": mean([s.fidelity for s in subs]),
    }
    for k, a in enumerate(ATTRIBUTES):
        out[f"fidelity_{a}"] = mean([s.matches[k] for s in subs])
    eligible = sum(v.eligible for v in verdicts)
    out["entanglement_rate"] = sum(v.leaks for v in verdicts) / eligible if eligible else nan
    out["entangled_image_rate"] = mean([v.leaks > 0 for v in verdicts if v.eligible])
    out["background_rate"] = mean([v.background_ok for v in verdicts if v.background_ok is not None])
    out["region_rate"] = mean([s.region_ok for s in subs if s.region_ok is not None])
    return out
