"""``musar toy all``: the whole chain in one resumable command, with progress and wall times.

Stages, each skipped when its output already exists (delete the output to redo a stage):

1. ``pretrain``: codec, then the base (``configs/toy_base.yaml``) -> ``base/``;
2. ``data``: 3000 brief training-split pairs -> ``pairs.parquet``;
3. ``train:<variant>`` for every Fig. 8 variant (``configs/toy_musar.yaml`` + overrides);
4. ``report``: gates 0-3 and the Fig. 8 table -> ``report/``.

Every stage appends a line to ``chain.log`` and its wall time to ``chain.json``, so a chain that
was interrupted and resumed still says what each stage cost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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

    def stage(self, name: str, done: bool, work: Callable[[], object]) -> None:
        if done:
            self.say(f"{name}: done before, skipped")
            return
        self.say(f"{name}: started")
        t0 = time.perf_counter()
        work()
        self.walls[name] = round(time.perf_counter() - t0, 1)
        atomic_write_json(self.json_path, self.walls)
        self.say(f"{name}: finished in {self.walls[name]:.0f}s")


def run_chain(
    out: str | Path, base_config: str | None, musar_config: str, threads: int | None = None,
    base_overrides: tuple[str, ...] = (), train_overrides: tuple[str, ...] = (), report_args: dict[str, object] | None = None,
) -> dict[str, float]:
    """Run every unfinished stage under ``out``; returns the wall time of every stage run so far.

    ``base_overrides`` / ``train_overrides`` / ``report_args`` shorten the chain for tests."""
    from musar.toy.cli import _data, _pretrain, _train_extra
    from musar.toy.report import run_report
    from musar.toy.variants import train_variant

    out = Path(out)
    progress = _Progress(out)
    t0 = time.perf_counter()
    progress.stage("pretrain", (out / "base" / "model_index.json").is_file(),
                   lambda: _pretrain(out, base_config, list(base_overrides), threads))
    progress.stage("data", (out / "pairs.parquet").is_file(), lambda: _data(out, PAIRS))
    for name in VARIANTS:
        progress.stage(f"train:{name}", (variant_dir(out, name) / "lora.safetensors").is_file(),
                       lambda name=name: train_variant(name, out, musar_config, _train_extra(list(train_overrides), threads)))
    progress.stage("report", (out / "report" / "report.json").is_file(), lambda: run_report(out, **(report_args or {})))
    total = sum(progress.walls.values())
    progress.say(f"musar toy all: this call {time.perf_counter() - t0:.0f}s; all stages {total:.0f}s; "
                 f"table in {out / 'report' / 'report.md'}")
    return progress.walls
