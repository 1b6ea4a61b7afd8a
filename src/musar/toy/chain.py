"""``musar toy all``: the whole chain in one resumable command, with progress and wall times.

Stages, each skipped when its output already exists (delete the output to redo a stage):

1. ``pretrain``: codec, then the base (``configs/toy_base.yaml``) -> ``base/``; a stopped one
   resumes from its newest checkpoint (:mod:`musar.toy.pretrain_state`);
2. ``data``: 3000 brief training-split pairs -> ``pairs.parquet``;
3. ``train``: every variant (``configs/toy_musar.yaml`` + overrides), ``jobs`` of them side by
   side, each in its own ``musar toy train`` process at one thread (on 2 cores two 1-thread runs
   finish sooner than the same runs one after another at 2 threads; docs/toy.md has the times);
   a variant whose LoRA exists is skipped and one that was stopped resumes from its newest
   checkpoint (every ``checkpoint_every`` steps, and on SIGINT / SIGTERM), so an interrupted
   chain loses at most a few minutes of training (:func:`musar.toy.variants.train_variant`);
4. ``report``: the gates and the Fig. 8 table -> ``report/``, ``jobs`` units (a row for one
   training seed, or the base's gates) side by side; finished units are kept under
   ``report/parts/``, so a stopped report resumes (:mod:`musar.toy.report_parts`).

Every stage appends a line to ``chain.log`` and its wall time to ``chain.json``, so a chain that
was interrupted and resumed still says what each stage cost (the train stage adds up the walls
of its calls; a base pretrained outside the chain counts with the wall ``pretrain.json`` gives).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from musar.toy.variants import VARIANTS, variant_dir
from musar.utils.io import atomic_write_json

PAIRS = 3000


class _Progress:
    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.log_path, self.json_path = out / "chain.log", out / "chain.json"
        self.walls: dict[str, float] = json.loads(self.json_path.read_text()) if self.json_path.is_file() else {}

    def say(self, text: str) -> None:
        line = f"{datetime.now(timezone.utc).strftime('%H:%M:%S')} {text}"
        print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def stage(self, name: str, done: bool, work: Callable[[], object], known_wall: float | None = None) -> None:
        if done:
            if name not in self.walls and known_wall is not None:  # done outside the chain
                self.walls[name] = known_wall
                atomic_write_json(self.json_path, self.walls)
            self.say(f"{name}: done before, skipped")
            return
        self.say(f"{name}: started")
        t0 = time.perf_counter()
        try:
            work()
        finally:  # an interrupted stage still counts the time it spent
            self.walls[name] = round(self.walls.get(name, 0.0) + time.perf_counter() - t0, 1)
            atomic_write_json(self.json_path, self.walls)
        self.say(f"{name}: finished in {self.walls[name]:.0f}s")


def train_side_by_side(
    out: Path, names: Sequence[str], config: str, overrides: Sequence[str], jobs: int, threads: int, say: Callable[[str], None],
) -> None:
    """Train ``names`` with ``jobs`` ``musar toy train`` processes at a time, ``threads`` each;
    each logs to ``musar/<name>.log``. A failed variant fails the stage after the others finish."""
    pending = [n for n in names if not (variant_dir(out, n) / "lora.safetensors").is_file()]
    running: list[tuple[str, subprocess.Popen[bytes], object]] = []
    failed: list[str] = []
    (out / "musar").mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < max(1, jobs):
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "musar.cli", "toy", "train", "--out", str(out), "--variant", name,
                   "--config", config, "--threads", str(threads), *(x for o in overrides for x in ("--set", o))]
            log = (out / "musar" / f"{name}.log").open("wb")
            say(f"train:{name}: started ({' '.join(cmd[2:])})")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(0.5)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()  # type: ignore[attr-defined]
            wall = variant_dir(out, name) / "wall.json"
            if proc.returncode == 0 and wall.is_file():
                say(f"train:{name}: finished in {json.loads(wall.read_text())['wall_s']:.0f}s")
            else:
                failed.append(name)
                say(f"train:{name}: FAILED (exit {proc.returncode}); see {out / 'musar' / (name + '.log')}")
    if failed:
        from musar.errors import MusarError

        raise MusarError(f"toy train failed for {', '.join(failed)}; logs under {out / 'musar'}")


def run_chain(
    out: str | Path, base_config: str | None, musar_config: str, threads: int | None = None,
    base_overrides: tuple[str, ...] = (), train_overrides: tuple[str, ...] = (), report_args: dict[str, object] | None = None,
    jobs: int = 2,
) -> dict[str, float]:
    """Run every unfinished stage under ``out``; returns the wall time of every stage run so far.

    ``jobs``: variants trained, and report units scored, side by side (each at ``threads // jobs``
    threads, at least one).
    ``base_overrides`` / ``train_overrides`` / ``report_args`` shorten the chain for tests."""
    from musar.toy.report import run_report
    from musar.toy.stages import data, pretrain

    out = Path(out)
    progress = _Progress(out)
    t0 = time.perf_counter()
    info = out / "pretrain.json"
    progress.stage("pretrain", (out / "base" / "model_index.json").is_file(),
                   lambda: pretrain(out, base_config, list(base_overrides), threads),
                   known_wall=json.loads(info.read_text()).get("wall_s") if info.is_file() else None)
    progress.stage("data", (out / "pairs.parquet").is_file(), lambda: data(out, PAIRS))
    per_job = max(1, (threads or 2) // max(1, jobs))
    progress.stage("train", all((variant_dir(out, n) / "lora.safetensors").is_file() for n in VARIANTS),
                   lambda: train_side_by_side(out, list(VARIANTS), musar_config, train_overrides, jobs, per_job, progress.say))
    progress.stage("report", (out / "report" / "report.json").is_file(), lambda: run_report(out, **{"jobs": jobs, "threads": per_job, **(report_args or {})}))
    total = sum(progress.walls.values())
    progress.say(f"musar toy all: this call {time.perf_counter() - t0:.0f}s; all stages {total:.0f}s; "
                 f"table in {out / 'report' / 'report.md'}")
    return progress.walls
