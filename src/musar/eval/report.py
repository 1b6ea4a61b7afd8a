"""Report files of an evaluation run, and the cross-run comparison table.

Files under the output folder (all written atomically):

* ``cases.csv``: one row per generated image, columns :data:`CASES_COLUMNS`. ``kind`` is
  ``single`` or ``multi`` (Table 1's column groups); the ``*_per_subject`` columns hold the
  per-subject means, ``;``-separated in the case's subject order. Metric cells are empty when
  the run skipped metrics or the value is degenerate (NaN, infinite).
* ``summary.json`` (strict JSON: ``null`` where there is no value, never NaN): settings, counts,
  and per group (``single``, ``multi``, ``all``) and metric the mean, sample standard deviation
  and a 95% interval, over the finite values only. The interval is a normal
  approximation over *cases*: the seeds of one case are averaged first (they share prompt and
  subjects, so they are not independent draws), then mean ± 1.96·s/√n over the n cases. With a
  single case there is no interval (``null``).
* ``table.md``: paper Table 1 layout, with the paper's MUSAR row for reference.
* ``grids/<case_id>.jpg``: the condition images, then one generated image per seed.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from musar.errors import MusarError
from musar.utils.io import (
    atomic_write,
    json_writer,
    text_writer,
    write_unit,
)
from musar.utils.safe_load import as_path, read_json

CASES_COLUMNS: tuple[str, ...] = (
    "case_id",
    "kind",
    "seed",
    "image",
    "dino",
    "clip_i",
    "clip_t",
    "n_subjects",
    "subjects",
    "prompt",
    "dino_per_subject",
    "clip_i_per_subject",
)
METRICS: tuple[str, ...] = ("dino", "clip_t", "clip_i")  # Table 1 column order
GROUPS: tuple[str, ...] = ("single", "multi")
PAPER_MUSAR: dict[str, dict[str, float]] = {
    "single": {"dino": 0.774, "clip_t": 30.29, "clip_i": 0.833},
    "multi": {"dino": 0.704, "clip_t": 33.90, "clip_i": 0.720},
}
PAPER_LABEL = "MUSAR (paper Table 1, reference)"
INTERVAL_METHOD = "normal approximation over cases (seeds averaged per case): mean ± 1.96·s/√n"
_Z95 = 1.96


@dataclass
class ImageRow:
    """One generated image and its scores (a ``cases.csv`` row)."""

    case_id: str
    kind: str = field(default="single", metadata={"help": "'single' or 'multi'"})
    seed: int = 0
    image: str = field(default="", metadata={"help": "path relative to the run folder"})
    dino: float | None = None
    clip_i: float | None = None
    clip_t: float | None = None
    n_subjects: int = 1
    subjects: str = field(default="", metadata={"help": "subject names joined by '+'"})
    prompt: str = ""
    dino_per_subject: tuple[float, ...] = ()
    clip_i_per_subject: tuple[float, ...] = ()


def _score(value: float | None) -> float | None:
    """A metric value, or None when it is missing or degenerate (NaN, infinite): never averaged,
    never written as NaN (summary.json is strict JSON)."""
    return value if value is not None and math.isfinite(value) else None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = _score(value)
        return "" if value is None else f"{value:.6f}"
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ";".join(_cell(v) for v in value)
    return str(value)


def cases_csv(rows: Sequence[ImageRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CASES_COLUMNS)
    for row in rows:
        d = asdict(row)
        writer.writerow([_cell(d[c]) for c in CASES_COLUMNS])
    return buf.getvalue()


def _stats(case_means: list[float], n_images: int) -> dict[str, Any]:
    n = len(case_means)
    mean = statistics.fmean(case_means)
    std = statistics.stdev(case_means) if n > 1 else None
    half = _Z95 * std / math.sqrt(n) if std is not None else None
    return {
        "mean": mean,
        "std": std,
        "ci95": [mean - half, mean + half] if half is not None else None,
        "n_cases": n,
        "n_images": n_images,
    }


def summarize(rows: Sequence[ImageRow], settings: dict[str, Any]) -> dict[str, Any]:
    """summary.json content (see module docstring for the interval)."""
    groups: dict[str, list[ImageRow]] = {g: [r for r in rows if r.kind == g] for g in GROUPS}
    groups["all"] = list(rows)
    metrics: dict[str, dict[str, Any]] = {}
    counts: dict[str, Any] = {}
    for name, members in groups.items():
        if not members:
            continue
        counts[name] = {"cases": len({r.case_id for r in members}), "images": len(members)}
        per_metric = {}
        for m in METRICS:
            by_case: dict[str, list[float]] = {}
            for r in members:
                value = _score(getattr(r, m))
                if value is not None:
                    by_case.setdefault(r.case_id, []).append(value)
            if by_case:
                per_metric[m] = _stats(
                    [statistics.fmean(v) for v in by_case.values()], sum(map(len, by_case.values()))
                )
        if per_metric:
            metrics[name] = per_metric
    return {
        "label": run_label(settings),
        "settings": settings,
        "counts": counts,
        "metrics": metrics,
        "interval": INTERVAL_METHOD,
        "paper_musar": PAPER_MUSAR,
    }


def run_label(settings: dict[str, Any], fallback: str = "run") -> str:
    """Row name for tables: the explicit label, else model/preset + LoRA file + ablation."""
    if settings.get("label"):
        return str(settings["label"])
    label = str(
        settings.get("model") or (f"preset {settings['preset']}" if settings.get("preset") else fallback)
    )
    if settings.get("lora"):
        label += f" + {Path(str(settings['lora'])).name}"
    if settings.get("ablation") not in (None, "none"):
        label += f" [{settings['ablation']}]"
    return label


def _fmt(metric: str, value: float) -> str:
    return f"{value:.2f}" if metric == "clip_t" else f"{value:.3f}"


def _format_cell(metric: str, stats: dict[str, Any] | None) -> str:
    if not stats:
        return "–"
    text = _fmt(metric, stats["mean"])
    if stats.get("ci95"):
        half = (stats["ci95"][1] - stats["ci95"][0]) / 2
        text += f" ± {_fmt(metric, half)}"
    return text


def render_table(runs: Sequence[tuple[str, dict[str, dict[str, Any]]]], with_paper: bool = True) -> str:
    """Markdown table in Table 1's layout. ``runs``: (row label, summary["metrics"]) pairs."""
    names = {"dino": "DINO", "clip_t": "CLIP-T", "clip_i": "CLIP-I"}
    header = ["Method"] + [f"{g.capitalize()} {names[m]}" for g in GROUPS for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if with_paper:
        cells = [_fmt(m, PAPER_MUSAR[g][m]) for g in GROUPS for m in METRICS]
        lines.append(f"| {PAPER_LABEL} | " + " | ".join(cells) + " |")
    for label, metrics in runs:
        cells = [_format_cell(m, metrics.get(g, {}).get(m)) for g in GROUPS for m in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_run_table(summary: dict[str, Any]) -> str:
    """table.md of one run: the table plus counts and how to read the ± column."""
    counts = ", ".join(
        f"{g}: {c['cases']} cases / {c['images']} images" for g, c in summary["counts"].items() if g != "all"
    )
    return (
        f"# Evaluation: {summary['label']}\n\n"
        + render_table([(summary["label"], summary["metrics"])])
        + f"\n{counts or 'no images'}. ± is the half-width of the 95% interval ({INTERVAL_METHOD}).\n"
        "DINO and CLIP-I are cosines in [-1, 1]; CLIP-T is 100 x cosine. Numbers are only comparable "
        "with the paper's for real FLUX.1-dev weights, a trained LoRA and the real metric models.\n"
    )


def write_report(out_dir: Path, rows: Sequence[ImageRow], settings: dict[str, Any]) -> dict[str, Any]:
    """Write cases.csv, summary.json and table.md as one unit (a full disk changes none of them, so
    the three never describe different runs); return the summary."""
    summary = summarize(rows, settings)
    write_unit({out_dir / "cases.csv": text_writer(cases_csv(rows)),
                out_dir / "summary.json": json_writer(summary, strict=True),
                out_dir / "table.md": text_writer(render_run_table(summary))})
    return summary


def _thumb(image: Image.Image, size: int) -> Image.Image:
    return ImageOps.pad(image.convert("RGB"), (size, size), color=(255, 255, 255))


def write_grid(
    path: Path,
    references: Sequence[tuple[Image.Image, str]],
    generated: Sequence[tuple[int, Image.Image]],
    prompt: str,
    cell: int = 256,
) -> None:
    """references (with their phrases) | one image per seed, prompt on top, captions below."""
    cells = [(_thumb(im, cell), f"ref: {phrase}") for im, phrase in references]
    cells += [(_thumb(im, cell), f"seed {seed}") for seed, im in generated]
    top, caption, gap = 24, 18, 8
    width = max(1, len(cells)) * cell + gap * (len(references) > 0 and len(generated) > 0)
    grid = Image.new("RGB", (width, top + cell + caption), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), prompt[: max(20, width // 6)], fill=(0, 0, 0))
    x = 0
    for i, (im, text) in enumerate(cells):
        if i == len(references) and i > 0:
            x += gap  # visual separation between the conditions and the outputs
        grid.paste(im, (x, top))
        draw.text((x + 4, top + cell + 3), text[: cell // 6], fill=(0, 0, 0))
        x += cell
    atomic_write(path, lambda p: grid.save(p, format="JPEG", quality=90))


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = as_path(run_dir, "evaluation folder") / "summary.json"
    if not path.exists():
        raise MusarError(f"not an evaluation folder (no summary.json): {run_dir}")
    summary = read_json(path, "evaluation summary")
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        raise MusarError(f"{path} is not a musar evaluation summary")
    return summary


def compare(dirs: Sequence[str | Path]) -> str:
    """One Table-1 table across runs.

    Runs with the same label are merged into one row when they cover different column groups,
    so a single-subject run and a multi-subject run of the same model form one row, as in the
    paper. Labels come from summary.json (``--label`` or model + LoRA + ablation).
    """
    if not dirs:
        raise MusarError("compare needs at least one evaluation folder")
    rows: list[tuple[str, dict[str, dict[str, Any]]]] = []
    for d in dirs:
        summary = load_summary(d)
        label = str(summary.get("label") or Path(d).name)
        groups = {g: v for g, v in summary["metrics"].items() if g in GROUPS}
        target = next((r for r in rows if r[0] == label and not set(r[1]) & set(groups)), None)
        if target is not None:
            target[1].update(groups)
        else:
            taken = any(r[0] == label for r in rows)
            rows.append((f"{label} ({Path(d).name})" if taken else label, dict(groups)))
    return render_table(rows)
