"""The GPU suite: every speed and memory number of the project in one time-boxed command.

``bench/gpu_check.sh OUT`` installs the carried wheels and runs this module, which runs each part
(:mod:`musar.bench.parts`) in its own process under its own time box, inside one overall budget
(default 465 s from the script's start, so the whole command ends within 8 minutes):

    attention microbenchmark | forward bench | training step | end-to-end generation |
    quantised loading | pytest -m gpu

A part that fails, crashes or runs out of time costs only itself: its JSON keeps what it measured
and says why it stopped; the next part still runs. ``OUT`` receives one JSON per part,
``summary.json`` (statuses, wall times, every target met / missed / not judged) and ``suite.log``:
eight files, the most a device run brings back. ``--dry-run`` runs the same parts at tiny sizes on
the CPU (the test suite does, so this cannot rot).

    python -m musar.bench.suite OUT [--dry-run] [--parts ...] [--budget-s S]
    python -m musar.bench.suite --report OUT      # the tables of a finished run, as Markdown
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musar.bench.parts import SCHEMA, run_part
from musar.bench.report import format_report
from musar.bench.targets import forward_values, judge, train_values
from musar.errors import MusarError
from musar.utils.io import atomic_write_json
from musar.utils.safe_load import read_json


@dataclass(frozen=True)
class Box:
    """A part's time box: at most ``full_s`` on the GPU (``dry_s`` in the dry run); it is not
    started with less than ``min_s`` left, and later parts keep their ``min_s`` in reserve."""

    full_s: float
    dry_s: float
    min_s: float


# Estimates for an H200 from a bare machine (flex compiles included); the first GPU run's
# part_s values replace them. Order: the numbers the issue asks for, cheapest first, then the
# GPU tests with the time that is left (rerun alone with --parts pytest if they run out).
BOXES: dict[str, Box] = {
    "attention": Box(45, 60, 15),
    "forward": Box(120, 60, 30),
    "train_step": Box(70, 60, 25),
    "generate": Box(80, 60, 30),
    "quantization": Box(150, 90, 40),
    "pytest": Box(120, 90, 30),
}
PARTS = tuple(BOXES)
FULL_BUDGET_S = 465.0
DRY_BUDGET_S = 300.0
SCRATCH_BYTES = {"full": 40e9, "tiny": 1e8}  # the quantisation part's saved random pipeline (34 GB; its GGUF replaces the transformer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m musar.bench.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="folder for the JSON files (created)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks that every part runs")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run, in this order")
    p.add_argument("--budget-s", type=float, default=None, help=f"overall seconds (default {FULL_BUDGET_S:.0f}; dry run {DRY_BUDGET_S:.0f})")
    p.add_argument("--started", type=float, default=None, help="epoch seconds the command started (the shell script's)")
    p.add_argument("--box", nargs="+", default=[], metavar="PART=S", help="override parts' time boxes, e.g. forward=200")
    p.add_argument("--spawn", action="store_true", help="a fresh interpreter per part instead of forking a warm one")
    p.add_argument("--report", metavar="OUT", help="print the tables of a finished run and exit")
    p.add_argument("--run-part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    p.add_argument("--size", choices=("full", "tiny"), default="full", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report:
        print(format_report(Path(args.report)))
        return 0
    if args.run_part:
        return run_part(args.run_part, Path(args.part_out), args.size, Path.cwd(), Path(args.scratch))
    if not args.out:
        p.error("give the output folder")
    overrides = {}
    for item in args.box:
        part, _, seconds = item.partition("=")
        if part not in BOXES or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--box wants PART=SECONDS with PART one of {', '.join(PARTS)}, got {item!r}")
        overrides[part] = float(seconds)
    return run_suite(Path(args.out), args.parts, args.dry_run, args.budget_s, args.started, overrides, args.spawn)


def run_suite(
    out: Path,
    parts: list[str],
    dry_run: bool = False,
    budget_s: float | None = None,
    started: float | None = None,
    overrides: dict[str, float] | None = None,
    spawn: bool = False,
) -> int:
    size = "tiny" if dry_run else "full"
    overrides = overrides or {}
    budget = budget_s or (DRY_BUDGET_S if dry_run else FULL_BUDGET_S)
    started = started or time.time()
    deadline = started + budget
    out.mkdir(parents=True, exist_ok=True)
    scratch = scratch_folder(SCRATCH_BYTES[size])
    status: dict[str, Any] = {}
    log = out / "suite.log"
    fork = not spawn and warm_start(cuda=not dry_run)
    try:
        with log.open("a", encoding="utf-8") as logf:
            for i, name in enumerate(parts):
                reserve = sum(min(BOXES[p].min_s, overrides.get(p, BOXES[p].min_s)) for p in parts[i + 1:])
                limit = overrides.get(name, BOXES[name].dry_s if dry_run else BOXES[name].full_s)
                box = min(limit, deadline - time.time() - reserve)  # later parts keep their minimum
                min_s = min(BOXES[name].min_s, limit)
                status[name] = run_child(name, out / f"{name}.json", size, box, min_s, scratch, logf, fork)
                _write_summary(out, size, budget, started, parts, status)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # tens of GB of RAM when it lives in /dev/shm
    summary = _write_summary(out, size, budget, started, parts, status)
    print(format_report(out))
    bad = [n for n, s in summary["parts"].items() if s["status"] != "ok"]
    print(f"musar bench suite: {len(parts) - len(bad)}/{len(parts)} parts ok in {summary['total_s']:.0f} s; wrote {out}",
          file=sys.stderr)
    return 1 if bad else 0


def scratch_folder(need_bytes: float) -> Path:
    """Room for the saved random pipeline: RAM-backed /dev/shm first, then the temporary directory."""
    for base in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        if base.is_dir() and os.access(base, os.W_OK) and shutil.disk_usage(base).free > need_bytes:
            return Path(tempfile.mkdtemp(prefix="musar-suite-", dir=base))
    return Path(tempfile.mkdtemp(prefix="musar-suite-"))  # parts that need more will say so


# Imported once by the suite before it forks each part, so a part starts with the stack loaded
# (seconds per part on a GPU machine, more on a small CPU). None of them touches CUDA at import.
WARM_MODULES = ("torch", "diffusers", "transformers", "pytest", "musar.bench.parts", "musar.bench.generation",
                "musar.bench.forward", "musar.bench.attention", "musar.bench.train_step", "musar.pipelines.presets")


def warm_start(cuda: bool) -> bool:
    """Import the stack for forked parts; False (fresh interpreters instead) where forking would
    be unsafe: no fork on this platform, or, for a GPU run, a forked probe that cannot run a CUDA
    kernel (as happens when something initialised CUDA in this process before the fork)."""
    if not hasattr(os, "fork"):
        return False
    import importlib

    for name in WARM_MODULES:
        with contextlib.suppress(Exception):  # the part that needs it reports the failure itself
            importlib.import_module(name)
    return not cuda or _wait(_fork_probe(), 120) == 0


def _fork_probe() -> int:
    """A forked child that initialises CUDA and runs one kernel (exit code 0 if it can)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        import torch

        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        code = 0
    finally:
        os._exit(code)


def run_child(
    name: str, path: Path, size: str, box: float, min_s: float, scratch: Path, logf: Any, fork: bool
) -> dict[str, Any]:
    """One part in its own process group (killed whole at the box); its JSON gets the final status."""
    if box < min_s:
        info = {"status": "skipped", "error": f"out of budget: {box:.0f} s left for it, needs at least {min_s:.0f} s",
                "wall_s": 0.0, "box_s": max(box, 0.0), "exit_code": None}
        _finalise(path, name, size, info)
        return info
    logf.write(f"\n===== {name} (box {box:.0f} s, {'forked' if fork else 'fresh interpreter'}) {time.strftime('%H:%M:%S')} =====\n")
    logf.flush()
    t0 = time.time()
    child = _fork_part(name, path, size, scratch, logf) if fork else _spawn_part(name, path, size, scratch, logf)
    code = _wait(child, box)
    wall = time.time() - t0
    data = _read(path)
    if code is None:
        info = {"status": "timeout", "error": f"stopped at its time box of {box:.0f} s; the results so far are kept"}
    elif code == 0 and data.get("status") == "ok":
        info = {"status": "ok", "error": None}
    else:
        info = {"status": "failed", "error": data.get("error") or f"exit code {code} before writing a result; see suite.log"}
    info.update(wall_s=wall, box_s=box, exit_code=code)
    _finalise(path, name, size, info)
    return info


def _fork_part(name: str, path: Path, size: str, scratch: Path, logf: Any) -> int:
    sys.stdout.flush()  # nothing buffered in the parent may be written twice
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: its own session (so the box kills its helpers too), output into the log
        os.setsid()
        os.dup2(logf.fileno(), 1)
        os.dup2(logf.fileno(), 2)
        code = run_part(name, path, size, Path.cwd(), scratch)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never return into the parent's loop (or its clean-up)


def _spawn_part(name: str, path: Path, size: str, scratch: Path, logf: Any) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "musar.bench.suite", "--run-part", name, "--part-out", str(path), "--size", size,
           "--scratch", str(scratch)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait(child: int | subprocess.Popen[bytes], box: float) -> int | None:
    """The exit code, or None after killing the part's process group at the end of its box."""
    if isinstance(child, subprocess.Popen):
        try:
            return child.wait(timeout=max(box, 0.0))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the part and anything it started (compile workers)
            child.wait()
            return None
    end = time.monotonic() + max(box, 0.0)
    while True:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= end:
            os.killpg(child, signal.SIGKILL)
            os.waitpid(child, 0)
            return None
        time.sleep(0.1)


def _read(path: Path) -> dict[str, Any]:
    try:  # our own files; a missing or damaged one (a part killed mid-write) reads as empty
        return read_json(path, expect=dict)
    except MusarError:
        return {}


def _finalise(path: Path, name: str, size: str, info: dict[str, Any]) -> None:
    data = _read(path) or {"schema": SCHEMA, "part": name, "size": size, "meta": {}, "results": {}}
    data.update(info)
    atomic_write_json(path, data)


def _write_summary(out: Path, size: str, budget: float, started: float, parts: list[str], status: dict[str, Any]) -> dict[str, Any]:
    data = {name: _read(out / f"{name}.json") for name in parts if name in status}
    metas = [d.get("meta", {}) for d in data.values() if d.get("meta")]
    cuda = bool(metas) and all(m.get("device") == "cuda" for m in metas)
    summary = {
        "schema": SCHEMA, "size": size, "budget_s": budget, "total_s": time.time() - started, "order": parts,
        "meta": metas[0] if metas else {},
        "parts": {n: {k: status[n].get(k) for k in ("status", "error", "wall_s", "box_s")} for n in parts if n in status},
        "targets": judge(suite_values(data), cuda),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def suite_values(parts: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Every target's value from the parts' results (missing parts give None)."""
    res = {name: d.get("results", {}) for name, d in parts.items()}
    forward, attention = res.get("forward", {}), res.get("attention", {})
    values = forward_values(forward.get("forward", []), attention.get("attention", []), forward.get("auto_backend", "flex"))
    values.update(train_values(res.get("train_step", {}).get("rows", [])))
    gen = res.get("generate", {}).get("generate", {})
    values["generate_28_steps_1024_c2_s"] = gen.get("seconds") if gen.get("steps") == 28 else None
    peaks = [m["generate"]["peak_gb"] for m in res.get("quantization", {}).get("modes", [])
             if m.get("status") == "ok" and m["mode"] != "none" and m["generate"].get("peak_gb") is not None]
    values["quantized_pipeline_peak_gb"] = min(peaks) if peaks else None
    return values


if __name__ == "__main__":
    sys.exit(main())
