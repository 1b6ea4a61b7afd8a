"""``musar toy report``: every variant on the same held-out cases, scored by the exact analyser.

For each variant (and the base model from the prompt alone, as a reference row) it generates
``seeds`` images per case, analyses them with :func:`musar.toy.analyser.evaluate` against the two
reference identities and the prompted scene, and writes ``report.md`` (the table), ``report.json``
(all numbers, per-case verdicts) and ``grid.png`` (references and one sample per variant).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from musar.toy.analyser import Verdict, evaluate, summarize
from musar.toy.cases import Case, generate_case, generate_text_only, make_cases
from musar.toy.codec import codec_round_trip
from musar.toy.model import load_toy_pipeline
from musar.toy.variants import VARIANTS, get_variant, variant_dir
from musar.toy.world import render_scene

METRICS: tuple[tuple[str, str], ...] = (
    ("all_present_rate", "both present"),
    ("attribute_fidelity", "attribute fidelity"),
    ("entanglement_rate", "entanglement (lower is better)"),
    ("background_rate", "background fidelity"),
    ("region_rate", "region fidelity"),
)


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _scores(verdicts: Sequence[Verdict], cases: Sequence[Case], per_case: int) -> dict[str, dict[str, float]]:
    same = [v for i, v in enumerate(verdicts) if cases[i // per_case].same_category]
    other = [v for i, v in enumerate(verdicts) if not cases[i // per_case].same_category]
    return {"all": summarize(verdicts), "same_category": summarize(same), "different_category": summarize(other)}


def _grid(rows: list[list[Image.Image]], scale: int = 2, pad: int = 2) -> Image.Image:
    w = max(len(r) for r in rows)
    side = rows[0][0].width * scale
    out = Image.new("RGB", (w * (side + pad) + pad, len(rows) * (side + pad) + pad), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            out.paste(img.resize((side, side), Image.NEAREST), (pad + x * (side + pad), pad + y * (side + pad)))
    return out


def run_report(
    out: str | Path, variants: Sequence[str] = tuple(VARIANTS), cases: int = 24, seeds: tuple[int, ...] = (0, 1),
    include_base: bool = True, report_dir: str | Path | None = None, log: Callable[[str], None] = print,
) -> dict[str, object]:
    """Score ``variants`` (trained under ``out``) on ``cases`` held-out cases x ``seeds``."""
    out = Path(out)
    dest = Path(report_dir) if report_dir is not None else out / "report"
    dest.mkdir(parents=True, exist_ok=True)
    test_cases = make_cases(cases)
    results: dict[str, dict[str, object]] = {}
    samples: dict[str, list[Image.Image]] = {}
    rows: list[tuple[str, str, str]] = []
    names = (["codec", "base"] if include_base else []) + list(variants)
    for name in names:
        t0 = time.perf_counter()
        verdicts: list[Verdict] = []
        images: list[Image.Image] = []
        if name == "codec":
            # What a perfect flow model could score at best: the prompted scene, rendered, through
            # the codec and back. Deterministic, so every seed gets the same image.
            vae = load_toy_pipeline(out / "base").vae
            for case in test_cases:
                imgs = [codec_round_trip(vae, render_scene(case.scene))] * len(seeds)
                images.extend(imgs)
                verdicts.extend(evaluate(im, case.identities, case.scene) for im in imgs)
            label, command = "codec round trip of the prompted scene (ceiling)", "musar toy pretrain"
        elif name == "base":
            pipe = load_toy_pipeline(out / "base")
            for case in test_cases:
                imgs = [generate_text_only(pipe, case.prompt, s) for s in seeds]
                images.extend(imgs)
                verdicts.extend(evaluate(im, case.identities, case.scene) for im in imgs)
            label, command = "base, prompt only (no references)", "musar toy pretrain"
        else:
            v = get_variant(name)
            lora = variant_dir(out, name) / "lora.safetensors"
            pipe = load_toy_pipeline(out / "base", lora=lora)
            for case in test_cases:
                imgs, _ = generate_case(pipe, case, seeds, v.static_routing, v.dynamic_routing)
                images.extend(imgs)
                verdicts.extend(evaluate(im, case.identities, case.scene) for im in imgs)
            label, command = v.label, f"musar toy train --variant {name}"
            wall_file = variant_dir(out, name) / "wall.json"
            if wall_file.is_file():
                results.setdefault(name, {})["train_wall_s"] = json.loads(wall_file.read_text())["wall_s"]
        scores = _scores(verdicts, test_cases, len(seeds))
        results.setdefault(name, {}).update({
            "label": label, "scores": scores, "generate_wall_s": round(time.perf_counter() - t0, 1),
            "verdicts": [v.describe() for v in verdicts],
        })
        samples[name] = images[:: len(seeds)]  # first seed of every case, for the grid
        rows.append((name, label, command))
        log(f"toy report {name}: " + ", ".join(f"{k} {_fmt(scores['all'][k])}" for k, _ in METRICS))

    lines = [
        f"Held-out cases: {len(test_cases)} (half same-shape pairs) x {len(seeds)} seeds = "
        f"{len(test_cases) * len(seeds)} images per row, 64x64, {GEN_STEPS} Euler steps.",
        "",
        "| variant | " + " | ".join(h for _, h in METRICS) + " | entanglement, same shape | train wall (s) |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    for name, label, _ in rows:
        r = results[name]
        s = r["scores"]  # type: ignore[index]
        cells = [_fmt(s["all"][k]) for k, _ in METRICS] + [_fmt(s["same_category"]["entanglement_rate"])]  # type: ignore[index]
        wall = r.get("train_wall_s", "")
        lines.append(f"| {label} (`{name}`) | " + " | ".join(cells) + f" | {wall} |")
    (dest / "report.md").write_text("\n".join(lines) + "\n")
    (dest / "report.json").write_text(json.dumps(results, indent=2))
    grid_rows = [c.reference_images() + [samples[n][i] for n in names] for i, c in enumerate(test_cases[:8])]
    _grid(grid_rows).save(dest / "grid.png")
    (dest / "grid.txt").write_text("columns: reference A, reference B, " + ", ".join(names) + "\n"
                                   + "\n".join(f"row {c.index}: {c.prompt}" for c in test_cases[:8]) + "\n")
    log(f"toy report: wrote {dest / 'report.md'} and {dest / 'grid.png'}")
    return results


GEN_STEPS = 16
