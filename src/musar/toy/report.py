"""``musar toy report``: the gates and the Fig. 8 table on held-out cases, scored by the analyser.

Rows of the Fig. 8 table (:data:`ROWS`): the codec ceiling, the base from the brief prompt alone,
every trained variant on two-subject cases, MUSAR on one subject (after stage 1 and at the end),
and the model trained at c = 2 used at c = 3. 'Routes given from the true layout' passes a box
around each subject's true tokens (the layout-control feature), the upper bound of routing. Every number carries its standard error.
Writes ``report.md``, ``report.json`` (all numbers and per-image verdicts) and ``grid.png``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from diffusers.utils import make_image_grid
from PIL import Image, ImageOps

from musar.toy import gates
from musar.toy.cases import make_cases
from musar.toy.metrics import fmt
from musar.toy.report_parts import GATES, GRID_IMAGES, Job, Unit, load_part, run_units, unit_key
from musar.toy.rows import COLUMNS, ROWS
from musar.toy.variants import get_variant, trained_members, variant_dir
from musar.utils import run_lock
from musar.utils.io import atomic_write_json, atomic_write_text, file_sha256

Rates = dict[str, tuple[float, float]]


def combine_seeds(per_seed: Sequence[Rates]) -> Rates:
    """One row's rates over training seeds: the mean of the seeds' means, with the standard error
    across seeds (one seed: its own standard error over images)."""
    if len(per_seed) == 1:
        return dict(per_seed[0])
    out: Rates = {}
    for key in per_seed[0]:
        means = [r[key][0] for r in per_seed if key in r and not math.isnan(r[key][0])]
        if not means:
            out[key] = (math.nan, math.nan)
            continue
        m = sum(means) / len(means)
        sd = math.sqrt(sum((x - m) ** 2 for x in means) / (len(means) - 1)) if len(means) > 1 else math.nan
        out[key] = (m, sd / math.sqrt(len(means)))
    return out


def _grid(rows: list[list[Image.Image]], scale: int = 2, border: int = 1) -> Image.Image:
    """``make_image_grid`` of the images scaled ``scale`` x (nearest), each in a white ``border``, the
    whole in one more: cells ``2 * border`` px apart and from the edge; short rows end in white."""
    side = rows[0][0].width * scale
    cols = max(len(r) for r in rows)
    blank = Image.new("RGB", (side, side), (255, 255, 255))
    cells = [ImageOps.expand(img.resize((side, side), Image.NEAREST) if img is not None else blank, border, "white")
             for row in rows for img in [*row, *[None] * (cols - len(row))]]
    return ImageOps.expand(make_image_grid(cells, len(rows), cols), border, "white")


def run_report(
    out: str | Path, rows: Sequence[str] | None = None, cases: int = 24, seeds: tuple[int, ...] = (0, 1),
    report_dir: str | Path | None = None, base_gates: bool = True, log: Callable[[str], None] = print,
    gate_cases: tuple[int, int] = (48, 24), jobs: int = 1, threads: int | None = None,
) -> dict[str, object]:
    """Score the ``rows`` (names of :data:`ROWS`; default all that can run) on ``cases`` held-out
    cases x ``seeds``; with ``base_gates`` also measure gates 0 and 1 on the base, on
    ``gate_cases`` (one-subject, two-subject) cases x the same seeds.

    The work is split into units kept under ``<report>/parts`` (:mod:`musar.toy.report_parts`):
    a stopped report resumes, ``jobs`` units run side by side at ``threads`` threads each
    (default: this process's threads shared out, at least one).
    """
    import torch

    out = Path(out)
    dest = Path(report_dir) if report_dir is not None else out / "report"
    # One report per folder: a second would score the same units again and race for report.json.
    with run_lock.hold(dest, "toy report"):
        return _run_report(out, dest, rows, cases, seeds, base_gates, log, gate_cases, jobs,
                           threads or max(1, torch.get_num_threads() // max(1, jobs)))


def _run_report(
    out: Path, dest: Path, rows: Sequence[str] | None, cases: int, seeds: tuple[int, ...], base_gates: bool,
    log: Callable[[str], None], gate_cases: tuple[int, int], jobs: int, threads: int,
) -> dict[str, object]:
    chosen = [r for r in ROWS if (rows is None or r.name in rows)]
    case_sets = {k: make_cases(cases, subjects=k) for k in sorted({r.subjects for r in chosen})}
    results: dict[str, dict[str, object]] = {}
    members: dict[str, list[str | None]] = {}
    for row in chosen:
        found: list[str | None] = list(trained_members(out, row.variant)) if row.variant else [None]
        members[row.name] = found if row.every_seed else found[:1]
        if not found:
            results[row.name] = {"label": row.label, "skipped": f"variant {row.variant} not trained"}
    units = [Unit(row.name, m) for row in chosen for m in members[row.name] if row.name not in results]
    units += [Unit(GATES)] if base_gates else []
    digest = functools.cache(file_sha256)  # every unit reads the base: hash each file once per report
    keys = {u: unit_key(out, u, cases, seeds, gate_cases, digest) for u in units}
    parts = {u: load_part(dest, u, keys[u]) for u in units}
    todo = [Job(str(out), str(dest), u, cases, tuple(seeds), gate_cases, threads, keys[u]) for u in units if parts[u] is None]
    if len(todo) < len(units):
        log(f"toy report: {len(units) - len(todo)} of {len(units)} units already done under {dest / 'parts'}")
    run_units(todo, jobs, log)
    parts.update({j.unit: load_part(dest, j.unit, keys[j.unit]) for j in todo})
    samples: dict[str, list[Image.Image]] = {}
    for row in chosen:
        if row.name in results:
            continue
        mine = [parts[Unit(row.name, m)] for m in members[row.name]]
        per_seed = [{k: tuple(v) for k, v in p["rates"].items()} for p in mine]  # type: ignore[index]
        entry: dict[str, object] = {"label": row.label, "command": row.command, "subjects": row.subjects,
                                    "verdicts": mine[0]["verdicts"]}  # type: ignore[index]
        samples[row.name] = mine[0]["images"]  # type: ignore[index]
        rates = combine_seeds(per_seed)
        entry["rates"] = {k: list(v) for k, v in rates.items()}
        if row.variant:
            entry["members"] = members[row.name]
            entry["seed_rates"] = [{k: list(v) for k, v in r.items()} for r in per_seed]
            walls = [json.loads(w.read_text())["wall_s"] for m in members[row.name]
                     if m and (w := variant_dir(out, m) / "wall.json").is_file()]
            if walls:
                entry["train_wall_s"] = round(sum(walls) / len(walls), 1)
        entry["generate_wall_s"] = round(sum(p["wall_s"] for p in mine), 1)  # type: ignore[index]
        results[row.name] = entry
        log(f"toy report {row.name} ({len(mine)} training seed(s)): "
            + ", ".join(f"{h} {fmt(rates.get(k, (math.nan, math.nan)))}" for k, h in COLUMNS))
    if base_gates:
        results["base_gates"] = parts[Unit(GATES)]["measured"]  # type: ignore[index]
    atomic_write_text(dest / "report.md", render_markdown(results, cases, seeds))
    atomic_write_json(dest / "report.json", results)  # last: the chain takes report.json as 'done'
    two = [r.name for r in chosen if r.subjects == 2 and r.name in samples]
    if two:  # the grid shows two-subject rows only; a report of other rows has none
        grid_rows = [c.reference_images() + [samples[n][i] for n in two] for i, c in enumerate(case_sets[2][:GRID_IMAGES])]
        _grid(grid_rows).save(dest / "grid.png")
        atomic_write_text(dest / "grid.txt", "columns: reference A, reference B, " + ", ".join(two) + "\n"
                          + "\n".join(f"row {c.index}: {c.prompt}" for c in case_sets[2][:GRID_IMAGES]) + "\n")
    log(f"toy report: wrote {dest / 'report.md'}")
    return results


CUSTOM_GROUPS = (("custom1", "single_stage1"), ("custom2", "full"), ("custom3", "three"), ("custom4", "four"))


def gate_results(results: dict[str, dict[str, object]]) -> tuple[dict[str, Rates], dict[str, list[Rates]]]:
    """The measured groups :func:`musar.toy.gates.check` reads, from a report's results, and for
    the groups measured over several training seeds, each seed's rates."""
    out: dict[str, Rates] = {k: {kk: tuple(vv) for kk, vv in v.items()}  # type: ignore[misc]
                             for k, v in results.get("base_gates", {}).items()}
    per_seed: dict[str, list[Rates]] = {}
    for group, row in CUSTOM_GROUPS:
        rates = results.get(row, {}).get("rates")
        if rates:
            out[group] = {k: tuple(v) for k, v in rates.items()}  # type: ignore[union-attr,misc]
            per_seed[group] = [{k: tuple(v) for k, v in r.items()}  # type: ignore[misc]
                               for r in results[row].get("seed_rates", [])]  # type: ignore[union-attr]
    return out, per_seed


def claims(results: dict[str, dict[str, object]]) -> list[tuple[str, str, bool | None]]:
    """Issue 21's comparison: ``full`` beats ``no_dynamic`` on all present at c = 3 and 4 by more
    than two standard errors of the difference, in every training seed of ``full``."""
    out = []
    for full, ablated in (("full", "no_dynamic"), ("three", "three_no_dynamic"), ("four", "four_no_dynamic")):
        a, b = results.get(full, {}), results.get(ablated, {})
        if "seed_rates" not in a or "rates" not in b:
            out.append((f"{full} > {ablated}", "not measured", None))
            continue
        nb, sb = b["rates"]["all_present"]  # type: ignore[index]
        texts, oks = [], []
        for r in a["seed_rates"]:  # type: ignore[union-attr]
            na, sa = r["all_present"]
            margin = 2 * math.sqrt(sa**2 + sb**2)
            oks.append(na - nb > margin)
            texts.append(f"{na:.2f} vs {nb:.2f} (needs > {nb + margin:.2f})")
        out.append((f"{full} > {ablated}, all present", "; ".join(texts), all(oks)))
    return out


def render_markdown(results: dict[str, dict[str, object]], cases: int, seeds: Sequence[int]) -> str:
    lines = ["## Gates (held-out identities; mean ± standard error)", "", "| gate | measured | result |", "|---|---|---|"]
    for gate, key, text, ok in gates.check(*gate_results(results)):
        lines.append(f"| {gate}: `{key}` | {text} | {'pass' if ok else ('-' if ok is None else 'MISS')} |")
    lines += ["", "| claim (every training seed of full) | measured | result |", "|---|---|---|"]
    for name, text, ok in claims(results):
        lines.append(f"| {name} | {text} | {'holds' if ok else ('-' if ok is None else 'FAILS')} |")
    base = results.get("base_gates", {})
    if base:
        clean = ", ".join(f"{g} {fmt(tuple(base[g]['clean']))}" for g in ("single", "two") if "clean" in base.get(g, {}))
        layers = ", ".join(f"{k} {fmt(tuple(v))}" for k, v in sorted(base.get("grounding", {}).items())
                           if k.startswith("L") and "_" not in k)
        lines += [""]
        if clean:
            lines.append(f"Gate 0 images with exactly as many objects as subjects (clean): {clean}.")
        if layers:
            lines.append(f"Gate 1 per layer (double blocks first): {layers}.")
    lines += ["", "Routing accuracy: the share of each subject's NOISE tokens routed to its own reference, late half of "
              "the steps, every layer; in brackets where dynamic routing is off (what S* would have chosen).",
              "Rows trained from several seeds show the mean over the seeds ± its standard error across seeds, then "
              "[lowest–highest seed]; other rows show ± the standard error over images.",
              "", f"## Fig. 8 table: {cases} held-out cases per subject count x {len(seeds)} seeds, 64 px, 16 Euler steps",
              "", "| row | " + " | ".join(h for _, h in COLUMNS) + " | train wall (s) | reproduce |",
              "|---" * (len(COLUMNS) + 3) + "|"]
    for row in ROWS:
        r = results.get(row.name)
        if r is None:
            continue
        if "skipped" in r:
            lines.append(f"| {row.label} | " + " | ".join("-" for _ in COLUMNS) + f" | - | not run: {r['skipped']} |")
            continue
        rates = {k: tuple(v) for k, v in r["rates"].items()}  # type: ignore[union-attr]
        cells = [fmt(rates.get(k, (math.nan, math.nan))) for k, _ in COLUMNS]  # type: ignore[arg-type]
        seed_rates = r.get("seed_rates", [])
        if len(seed_rates) > 1:  # the spread over training seeds, after the mean and its error
            for i, (k, _) in enumerate(COLUMNS):
                vals = [sr[k][0] for sr in seed_rates if k in sr and not math.isnan(sr[k][0])]  # type: ignore[index]
                if vals and cells[i] != "n/a":
                    cells[i] += f" [{min(vals):.2f}–{max(vals):.2f}]"
        if row.variant is not None and not get_variant(row.variant).dynamic_routing:
            # no route is taken: the column shows where S* *would* route, in brackets
            cells = [f"({c})" if k.startswith("routing_") and c != "n/a" else c for c, (k, _) in zip(cells, COLUMNS, strict=True)]
        label = row.label + (f" ({len(seed_rates)} training seeds)" if len(seed_rates) > 1 else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r.get('train_wall_s', '')} | `{row.command}` |")
    return "\n".join(lines) + "\n"

