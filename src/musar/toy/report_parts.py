"""The report's units of work, each kept on disk when done and run side by side.

A unit is one (row, trained member) pair, or the base's gates. A finished unit is written to
``<report>/parts/<unit>.json`` (its rates and verdicts; the first images, for the grid, in
``<unit>.png``) under a key naming what it was computed from: the cases, the seeds, and the
sha256 of every weight file it read. A stopped report keeps its finished units; the next call
computes only the missing or stale ones, ``jobs`` at a time, each in a worker process at
``threads`` threads (tests/test_toy_report_parts.py: the same numbers as one process).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from musar.utils.io import atomic_write, atomic_write_json, file_sha256

GATES = "base_gates"
GRID_IMAGES = 8  # cases the report's grid shows


@dataclass(frozen=True)
class Unit:
    row: str  # a musar.toy.rows.ROWS name, or GATES
    member: str | None = None  # the trained variant whose LoRA it reads (None: none)

    @property
    def name(self) -> str:
        return self.row if self.member is None else f"{self.row}.{self.member}"


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to compute one unit (picklable)."""

    out: str
    dest: str
    unit: Unit
    cases: int
    seeds: tuple[int, ...]
    gate_cases: tuple[int, int]
    threads: int
    key: dict[str, Any]


def weight_files(out: Path, unit: Unit) -> list[Path]:
    """The files whose bytes decide the unit's numbers: the base's, and the LoRA it loads."""
    from musar.toy.rows import ROWS
    from musar.toy.variants import stage1_lora, variant_dir

    files = sorted(p for p in (out / "base").rglob("*") if p.is_file())
    if unit.member is not None:
        row = next(r for r in ROWS if r.name == unit.row)
        files.append(stage1_lora(out, unit.member) if row.stage1 else variant_dir(out, unit.member) / "lora.safetensors")
    return files


def unit_key(out: Path, unit: Unit, cases: int, seeds: Sequence[int], gate_cases: tuple[int, int],
             digest: Callable[[Path], str] = file_sha256) -> dict[str, Any]:
    key: dict[str, Any] = {"unit": unit.name, "cases": list(gate_cases) if unit.row == GATES else cases,
                           "seeds": list(seeds)}
    key["weights"] = {str(p.relative_to(out)) if p.is_relative_to(out) else str(p): digest(p)
                      for p in weight_files(out, unit)}
    return key


def part_path(dest: Path, unit: Unit) -> Path:
    return dest / "parts" / f"{unit.name}.json"


def load_part(dest: Path, unit: Unit, key: dict[str, Any]) -> dict[str, Any] | None:
    """The unit's saved result if it was computed from exactly ``key`` (else None: recompute)."""
    path = part_path(dest, unit)
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or cut short by a kill before the atomic rename
        return None
    if not isinstance(part, dict) or part.get("key") != key:
        return None
    if unit.row != GATES and not part.get("images"):
        part["images"] = []
    elif unit.row != GATES:
        from PIL import Image

        try:
            with Image.open(path.with_suffix(".png")) as strip:
                strip.load()
                side = strip.height
                part["images"] = [strip.crop((i * side, 0, (i + 1) * side, side)) for i in range(strip.width // side)]
        except (OSError, ValueError):
            return None
    return part


def compute(job: Job) -> str:
    """Compute one unit at ``job.threads`` threads and write its part; returns the log line."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _compute(job)
    finally:  # run in the caller's process (jobs 1), it keeps the caller's own setting
        torch.set_num_threads(before)


def _compute(job: Job) -> str:
    from musar.toy import gates
    from musar.toy.cases import make_cases
    from musar.toy.model import load_toy_pipeline
    from musar.toy.rows import ROWS
    from musar.toy.scoring import generate

    out, dest, unit = Path(job.out), Path(job.dest), job.unit
    t0 = time.perf_counter()
    part: dict[str, Any] = {"key": job.key}
    if unit.row == GATES:
        measured = gates.base_gates(load_toy_pipeline(out / "base"), *job.gate_cases, seeds=job.seeds)
        part["measured"] = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in measured.items()}
        line = gates.summary_line(measured)
    else:
        row = next(r for r in ROWS if r.name == unit.row)
        rates, verdicts, images = generate(row, out, make_cases(job.cases, subjects=row.subjects), job.seeds,
                                                  unit.member)
        part.update(rates={k: list(v) for k, v in rates.items()}, verdicts=verdicts)
        shown = images[:: len(job.seeds)][:GRID_IMAGES]
        part["images"] = len(shown)
        if shown:
            from PIL import Image

            side = shown[0].height
            strip = Image.new("RGB", (side * len(shown), side))
            for i, im in enumerate(shown):
                strip.paste(im, (i * side, 0))
            atomic_write(part_path(dest, unit).with_suffix(".png"), lambda p: strip.save(p, format="PNG"))
        line = f"{len(verdicts)} images"
    part["wall_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(part_path(dest, unit), part)  # last: the json is what marks the unit done
    return f"toy report {unit.name}: {line} ({part['wall_s']:.0f}s)"


def run_units(jobs: Sequence[Job], workers: int, log: Callable[[str], None]) -> None:
    """Compute ``jobs``, ``workers`` at a time (1: in this process), costliest first."""
    if not jobs:
        return
    Path(jobs[0].dest, "parts").mkdir(parents=True, exist_ok=True)
    order = sorted(jobs, key=_cost, reverse=True)  # the longest first keeps both workers busy to the end
    if workers <= 1 or len(order) == 1:
        for job in order:
            log(compute(job))
        return
    # spawn, not fork: a forked child inherits torch's thread pools in whatever state they are.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for line in pool.map(compute, order):
            log(line)


def _cost(job: Job) -> int:
    from musar.toy.rows import ROWS

    if job.unit.row == GATES:
        return sum(job.gate_cases) * 2
    row = next(r for r in ROWS if r.name == job.unit.row)
    return job.cases * (row.subjects + 1)
