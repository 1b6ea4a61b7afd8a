"""One report row's images and scores: generate a row's images for one training member and score
them with the analyser (shared by :mod:`musar.toy.report` and its worker processes,
:mod:`musar.toy.report_parts`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from musar.toy import probes
from musar.toy.analyser import evaluate
from musar.toy.cases import Case
from musar.toy.codec import codec_round_trip
from musar.toy.metrics import attribute_rates, diptych_artefact, entanglement, mean_se
from musar.toy.model import load_toy_pipeline
from musar.toy.rows import Row
from musar.toy.sampling import sample_text_only
from musar.toy.variants import get_variant, stage1_lora, variant_dir
from musar.toy.world import render_scene

Rates = dict[str, tuple[float, float]]


def _score(images: Sequence[Image.Image], cases: Sequence[Case], per_case: int) -> tuple[Rates, list[str]]:
    flat = [c for c in cases for _ in range(per_case)]
    verdicts = [evaluate(im, c.identities, c.scene) for im, c in zip(images, flat, strict=True)]
    rates = attribute_rates(verdicts)
    if len(cases[0].identities) >= 2:
        rates["entanglement"] = entanglement(verdicts)
        rates["entanglement_same"] = entanglement([v for v, c in zip(verdicts, flat, strict=True) if c.same_category])
    rates["artefact"] = mean_se([
        diptych_artefact(im, v.analysis, len(c.identities)) for im, v, c in zip(images, verdicts, flat, strict=True)
    ])
    return rates, [v.describe() for v in verdicts]


def generate(
    row: Row, out: Path, cases: Sequence[Case], seeds: Sequence[int], member: str | None = None,
) -> tuple[Rates, list[str], list[Image.Image]]:
    """One row's images and scores; ``member``: which trained variant of the row's family."""
    if row.name == "codec":
        vae = load_toy_pipeline(out / "base").vae
        images = [codec_round_trip(vae, render_scene(c.scene)) for c in cases for _ in seeds]
        rates, verdicts = _score(images, cases, len(seeds))
        return rates, verdicts, images
    if row.variant is None:
        pipe = load_toy_pipeline(out / "base")
        images = sample_text_only(pipe, [c.prompt for c in cases for _ in seeds], [s for _ in cases for s in seeds])
        rates, verdicts = _score(images, cases, len(seeds))
        return rates, verdicts, images
    name = member or row.variant
    variant = get_variant(name)
    lora = stage1_lora(out, name) if row.stage1 else variant_dir(out, name) / "lora.safetensors"
    pipe = load_toy_pipeline(out / "base", lora=lora)
    rates, _, images = probes.customization(pipe, cases, seeds, variant.static_routing, variant.dynamic_routing,
                                            routes_from=row.routes_from)
    scored, verdicts = _score(images, cases, len(seeds))
    scored.update({k: v for k, v in rates.items() if k.startswith("routing_")})
    return scored, verdicts, images
