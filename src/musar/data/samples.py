"""Training samples: single-subject pairs and two-subject diptychs built from them (docs/design.md sec. 6).

A single-subject sample uses one view of a Subjects200K row as the condition and the other as the
target, with the target view's description as the prompt and ``item`` as the subject phrase.
A diptych (c = 2) puts two such targets side by side, keeps both references, and writes the prompt
with the two-column template of the paper's Fig. 2 (:data:`DIPTYCH_TEMPLATE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from musar.data.subjects200k import SubjectPair, Subjects200K
from musar.errors import MusarError

DIPTYCH_TEMPLATE = (
    "Two images concatenated side by side, the left part is: {phrase_a}. {desc_a}, "
    "the right part is: {phrase_b}. {desc_b}"
)
_ARTICLES = ("a ", "an ", "the ")


@dataclass
class Sample:
    """What one training example shows the model: references -> target, described by prompt."""

    prompt: str = field(default="", metadata={"help": "Text prompt; contains every phrase."})
    target: Image.Image | None = field(default=None, metadata={"help": "RGB target image."})
    references: list[Image.Image] = field(
        default_factory=list, metadata={"help": "RGB condition images, one per subject, left to right."}
    )
    phrases: list[str] = field(
        default_factory=list, metadata={"help": "Subject phrase of each reference, same order."}
    )
    meta: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Provenance (kind, row ids, stage, ...); JSON-able."}
    )

    @property
    def num_conditions(self) -> int:
        return len(self.references)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able record of the sample (images as sizes), for samples.jsonl."""
        return {
            "prompt": self.prompt,
            "phrases": list(self.phrases),
            "num_conditions": self.num_conditions,
            "target_size": list(self.target.size) if self.target is not None else None,
            "reference_sizes": [list(r.size) for r in self.references],
            "meta": self.meta,
        }


def phrase_in_prompt(phrase: str, prompt: str) -> bool:
    """Whether the span finder (:mod:`musar.utils.spans`) will locate ``phrase`` in ``prompt``."""
    from musar.utils.spans import find_phrase_chars  # the training loop's own rule, not a copy of it

    try:
        find_phrase_chars(prompt, [phrase])
    except MusarError:
        return False
    return True


def single_sample(pair: SubjectPair, target_view: int) -> Sample:
    """Condition = the other view, target = ``views[target_view]``, prompt = its description.

    The subject phrase must occur in the prompt for the span finder; captions that do not mention
    ``item`` verbatim get it prepended as ``"{item}. {description}"``, the diptych template's form.
    """
    if target_view not in (0, 1):
        raise ValueError(f"target_view must be 0 or 1, got {target_view}")
    item, desc = pair.item.strip(), pair.descriptions[target_view].strip()
    prefixed = not phrase_in_prompt(item, desc)
    return Sample(
        prompt=f"{item}. {desc}" if prefixed else desc,
        target=pair.views[target_view],
        references=[pair.views[1 - target_view]],
        phrases=[item],
        meta={
            "kind": "single",
            "description": desc,
            "phrase_prefixed": prefixed,
            "row_id": pair.row_id,
            "item": pair.item,
            "category": pair.category,
            "target_view": target_view,
        },
    )


def single_samples(pair: SubjectPair) -> list[Sample]:
    """Both orders of one pair: view 1 -> view 0 and view 0 -> view 1."""
    return [single_sample(pair, 0), single_sample(pair, 1)]


def another_phrase(phrase: str) -> str:
    """Mark the second of two same-category subjects: ``"a dog"`` -> ``"another dog"``.

    A leading article ``"a "``, ``"an "`` or ``"the "`` (any case) is replaced by ``"another "``;
    a phrase without one just gets the prefix (``"corgi"`` -> ``"another corgi"``); a phrase that
    already starts with ``"another "`` is left as is.
    """
    text = phrase.strip()
    lower = text.lower()
    if lower.startswith("another "):
        return text
    for article in _ARTICLES:
        if lower.startswith(article):
            return "another " + text[len(article) :].lstrip()
    return "another " + text


def diptych_prompt(phrase_a: str, desc_a: str, phrase_b: str, desc_b: str) -> str:
    """Fill :data:`DIPTYCH_TEMPLATE`.

    A description's trailing period is dropped so the template's own punctuation does not
    produce ``"..., the right part"`` after a ``"."``.
    """

    def clean(desc: str) -> str:
        return desc.strip().rstrip(".").rstrip()

    return DIPTYCH_TEMPLATE.format(
        phrase_a=phrase_a, desc_a=clean(desc_a), phrase_b=phrase_b, desc_b=clean(desc_b)
    )


def hconcat(left: Image.Image, right: Image.Image) -> Image.Image:
    """Side by side; the right image is scaled to the left one's height if they differ."""
    if right.height != left.height:
        width = max(1, round(right.width * left.height / right.height))
        right = right.resize((width, left.height), Image.Resampling.LANCZOS)  # the pipeline's filter
    out = Image.new("RGB", (left.width + right.width, left.height))
    out.paste(left.convert("RGB"), (0, 0))
    out.paste(right.convert("RGB"), (left.width, 0))
    return out


def make_diptych(left: Sample, right: Sample, *, same_category: bool) -> Sample:
    """Two single-subject samples -> one c = 2 sample; ``same_category`` turns on the "another " rule."""
    if left.num_conditions != 1 or right.num_conditions != 1 or left.target is None or right.target is None:
        raise ValueError("a diptych is built from two single-subject samples")
    phrase_a = left.phrases[0]
    phrase_b = another_phrase(right.phrases[0]) if same_category else right.phrases[0]
    return Sample(
        # The raw captions: the template names each phrase already, so no "{item}. " prefix twice.
        prompt=diptych_prompt(
            phrase_a,
            left.meta.get("description", left.prompt),
            phrase_b,
            right.meta.get("description", right.prompt),
        ),
        target=hconcat(left.target, right.target),
        references=[left.references[0], right.references[0]],
        phrases=[phrase_a, phrase_b],
        meta={"kind": "diptych", "same_category": same_category, "left": left.meta, "right": right.meta},
    )


class DiptychSampler:
    """Draws single-subject samples and random / same-category diptychs from a Subjects200K source.

    All randomness comes from the ``rng`` passed to each call, so a caller that seeds the rng per
    sample gets a stream that depends only on that seed. Rows whose image turns out corrupt are
    skipped by redrawing from the same rng (deterministic, bounded by ``max_tries``).
    """

    def __init__(self, source: Subjects200K, max_tries: int = 64) -> None:
        self.source = source
        self.max_tries = max_tries
        # Built once: only rows whose category has a second member can start a same-category pair.
        self._pairable = [k for k in range(len(source)) if len(source.category_members(k)) >= 2]

    def _single(self, k: int, rng: np.random.Generator) -> Sample | None:
        pair = self.source.pair(k)
        return None if pair is None else single_sample(pair, int(rng.integers(2)))

    def _give_up(self, what: str) -> MusarError:
        return MusarError(
            f"{self.source.report.source}: {self.max_tries} unusable rows in a row while drawing {what}"
        )

    def single(self, rng: np.random.Generator) -> Sample:
        """A random row, a random view as the target."""
        for _ in range(self.max_tries):
            sample = self._single(int(rng.integers(len(self.source))), rng)
            if sample is not None:
                return sample
        raise self._give_up("a single-subject sample")

    def random_pair(self, rng: np.random.Generator) -> Sample:
        """Two distinct random rows (stage 2); "another " only if they happen to share a category."""
        n = len(self.source)
        if n < 2:
            raise MusarError(f"{self.source.report.source}: a diptych needs at least two usable rows")
        for _ in range(self.max_tries):
            k1 = int(rng.integers(n))
            k2 = int(rng.integers(n - 1))
            k2 += k2 >= k1  # uniform over the other rows
            sample = self._diptych(k1, k2, rng)
            if sample is not None:
                return sample
        raise self._give_up("a random-pair diptych")

    def same_category_pair(self, rng: np.random.Generator) -> Sample:
        """Two distinct rows of one category (stage 3); the right phrase always gets "another "."""
        if not self._pairable:
            raise MusarError(
                f"{self.source.report.source}: no category has two usable rows for same-category diptychs"
            )
        for _ in range(self.max_tries):
            k1 = self._pairable[int(rng.integers(len(self._pairable)))]
            others = [k for k in self.source.category_members(k1) if k != k1]
            k2 = others[int(rng.integers(len(others)))]
            sample = self._diptych(k1, k2, rng)
            if sample is not None:
                return sample
        raise self._give_up("a same-category diptych")

    def _diptych(self, k1: int, k2: int, rng: np.random.Generator) -> Sample | None:
        a, b = self._single(k1, rng), self._single(k2, rng)
        if a is None or b is None:
            return None
        if rng.random() < 0.5:  # random left/right order
            a, b = b, a
        return make_diptych(a, b, same_category=self.source.same_category(k1, k2))
