"""The parts of the GPU suite (:mod:`musar.bench.suite`), each run in its own process.

A part writes its JSON after every measurement (atomically), so a part stopped by its time box
keeps what it measured. ``full`` is FLUX.1-dev's size on a CUDA GPU; ``tiny`` is the same code
at toy sizes on a CPU (the dry run the tests use so the suite cannot rot).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musar.utils.io import atomic_write_json

SCHEMA = "musar.bench.suite/1"
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "torchao", "bitsandbytes", "gguf")


@dataclass(frozen=True)
class SuiteSize:
    """What every part measures at one size."""

    name: str
    device: str
    bench_preset: str  # musar bench preset of the forward and attention parts
    refs: tuple[int, ...]
    height: int
    width: int
    cond_size: int
    prompt_len: int
    phrase_len: int
    forward_repeats: int
    forward_warmup: int
    attention_repeats: int
    attention_warmup: int
    train_preset: str
    train_steps: int
    train_warmup: int
    train_attention: str  # the SDPA kernel chosen explicitly for training (docs/design.md sec. 9)
    generate_steps: int
    quant_steps: int
    # nf4 first: the 16 GB goal rests on it. The bf16 baseline of the GPU run is the forward part's
    # c = 2 row and the generate part's peak (same shapes, same run), so no "none" row is spent there.
    quant_modes: tuple[str, ...]


SIZES: dict[str, SuiteSize] = {
    "full": SuiteSize("full", "cuda", "flux-dev-random", (0, 1, 2, 3, 4), 1024, 1024, 512, 512, 32,
                      3, 1, 10, 3, "flux-dev-random", 3, 1, "flash", 28, 2, ("nf4", "int8wo", "fp8wo", "gguf")),
    "tiny": SuiteSize("tiny", "cpu", "tiny", (0, 2), 64, 64, 32, 16, 4,
                      1, 0, 1, 0, "tiny", 1, 0, "flash", 2, 1, ("none", "nf4", "int8wo", "fp8wo", "gguf")),
}


class PartRecord:
    """The JSON of one part: written after every update, finished with a status."""

    def __init__(self, part: str, path: Path, size: SuiteSize) -> None:
        self.path = path
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {"schema": SCHEMA, "part": part, "size": size.name, "status": "running",
                                     "error": None, "meta": environment(size.device), "results": {}}
        self._write()

    def update(self, **results: Any) -> None:
        self.data["results"].update(results)
        self._write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data.update(status=status, error=error, part_s=time.perf_counter() - self.started)
        self._write()

    def _write(self) -> None:
        atomic_write_json(self.path, self.data)


def environment(device: str) -> dict[str, Any]:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = device == "cuda" and torch.cuda.is_available()
    return {"device": device, "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "cuda": torch.version.cuda if cuda else None, "python": platform.python_version(), "versions": versions,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def bench_settings(size: SuiteSize, repeats: int, warmup: int, modes: list[str] | None = None) -> Any:
    """``musar bench`` settings for this size, validated by the bench's own parser logic."""
    from musar.bench.settings import settings_from_args

    ns = argparse.Namespace(
        preset=size.bench_preset, device=size.device, refs=list(size.refs), height=size.height, width=size.width,
        cond_size=size.cond_size, prompt_len=size.prompt_len, phrase_len=size.phrase_len, repeats=repeats,
        warmup=warmup, modes=modes, sdpa="default", no_attention=False, seed=0, dtype=None,
    )
    return settings_from_args(ns)


# ---- the parts ------------------------------------------------------------------------------


class _Outcomes:
    """pytest plugin: each test's outcome (and the failure's last line) into the part's JSON."""

    def __init__(self, rec: PartRecord) -> None:
        self.rec = rec
        self.tests: dict[str, str] = {}
        self.reasons: dict[str, str] = {}

    def _note(self, nodeid: str, outcome: str, report: Any) -> None:
        self.tests[nodeid] = outcome
        if report.failed:
            text = str(report.longreprtext).strip().splitlines()
            self.reasons[nodeid] = (text[-1] if text else "")[:300]
        self.rec.update(tests=self.tests, reasons=self.reasons)

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call":
            self._note(report.nodeid, report.outcome.upper(), report)
        elif report.failed:  # a fixture or teardown error
            self._note(report.nodeid, "ERROR", report)
        elif report.when == "setup" and report.skipped:
            self._note(report.nodeid, "SKIPPED", report)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self._note(report.nodeid or "collection", "ERROR", report)


def part_pytest(size: SuiteSize, rec: PartRecord, root: Path, scratch: Path) -> str | None:
    """``pytest -m gpu`` over the test files that hold GPU tests, in this process (the stack is
    already imported), each outcome written to the JSON as it happens."""
    import pytest

    files = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text())
    args = ["-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", "--continue-on-collection-errors",
            "--rootdir", str(root), *(str(root / f) for f in files)]
    rec.update(args=args, files=files)
    outcomes = _Outcomes(rec)
    code = int(pytest.main(args, plugins=[outcomes]))
    counts = {k: sum(v == k for v in outcomes.tests.values()) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
    rec.update(counts=counts, exit_code=code)
    if code in (0, 5):  # 5: nothing collected (no GPU tests selected)
        return None
    bad = [t for t, o in outcomes.tests.items() if o in ("FAILED", "ERROR")]
    return f"pytest exit code {code}: {counts['FAILED']} failed, {counts['ERROR']} errors: " + ", ".join(bad[:5])


def part_attention(size: SuiteSize, rec: PartRecord, root: Path, scratch: Path) -> None:
    from musar.bench.attention import attention_bench
    from musar.models.layout import TokenLayout

    s = bench_settings(size, size.attention_repeats, size.attention_warmup)
    n, nc = (s.height // 16) * (s.width // 16), (s.cond_size // 16) ** 2
    backends = [b for b in ("reference", "fast", "flex") if b in s.modes]
    entries: list[dict[str, Any]] = []
    for c in s.refs:
        layout = TokenLayout.uniform(s.prompt_len, n, c, nc, s.phrase_len)
        entries.append(attention_bench(layout, heads=s.config["num_attention_heads"], head_dim=s.config["attention_head_dim"],
                                       device=s.device, dtype=s.dtype, backends=backends, warmup=s.warmup,
                                       repeats=s.repeats, seed=s.seed))
        rec.update(attention=entries, backends=backends)


def part_forward(size: SuiteSize, rec: PartRecord, root: Path, scratch: Path) -> None:
    from musar.bench.forward import forward_bench
    from musar.models.options import resolve_backend

    s = bench_settings(size, size.forward_repeats, size.forward_warmup)
    rec.update(settings={"height": s.height, "width": s.width, "cond_size": s.cond_size, "refs": s.refs,
                         "modes": s.modes, "repeats": s.repeats, "warmup": s.warmup, "dtype": str(s.dtype)},
               auto_backend=resolve_backend("auto", s.device))
    rows, routes = forward_bench(s, on_row=lambda rows: rec.update(forward=rows))
    rec.update(forward=rows, routes=routes)


def part_train_step(size: SuiteSize, rec: PartRecord, root: Path, scratch: Path) -> None:
    from musar.bench.train_step import main

    argv = ["--preset", size.train_preset, "--device", size.device, "--steps", str(size.train_steps),
            "--warmup", str(size.train_warmup), "--attention", size.train_attention]
    if size.device == "cpu":
        argv += ["--peak-tflops", "1"]  # MFU is meaningless on a CPU; keeps the column defined
    rec.update(argv=argv)
    code = main(argv, on_rows=lambda result: rec.update(**result))
    if code:
        raise RuntimeError(f"train_step exited with {code}")


def part_generate(size: SuiteSize, rec: PartRecord, root: Path, scratch: Path) -> None:
    """One end-to-end 28-step generation at 1024x1024 with c = 2, after a short warm-up run that
    compiles the flex kernels."""
    import torch

    from musar.bench.generation import component_gib, timed_generation

    device = torch.device(size.device)
    t0 = time.perf_counter()
    pipe = _build_pipeline(size, device)
    rec.update(build_s=time.perf_counter() - t0, weights_gib=component_gib(pipe), c=2,
               height=size.height, width=size.width, cond_size=size.cond_size)
    rec.update(warmup=timed_generation(pipe, device, size.height, size.width, size.cond_size, 2))
    rec.update(generate=timed_generation(pipe, device, size.height, size.width, size.cond_size, size.generate_steps))


def _build_pipeline(size: SuiteSize, device: Any) -> Any:
    """The random pipeline: FLUX.1-dev in bf16, or the same builder at toy size in float32."""
    import torch

    from musar.bench.generation import FLUX_DEV, TINY, random_flux_pipeline

    if size.name == "tiny":
        return random_flux_pipeline(device, torch.float32, TINY)
    return random_flux_pipeline(device, torch.bfloat16, FLUX_DEV)


def part_quantization(size: SuiteSize, rec: PartRecord, root: Path, scratch: Path) -> None:
    """Each ``--quantize`` mode at 1024x1024, c = 2: weights, one forward, a short generation."""
    import torch

    from musar.bench.generation import quantized_row, release, save_pipeline

    device = torch.device(size.device)
    t0 = time.perf_counter()
    pipe = _build_pipeline(size, device)
    rec.update(build_s=time.perf_counter() - t0, saved=save_pipeline(pipe, scratch))
    del pipe
    release(device)
    folder = scratch / "pipeline"
    s = bench_settings(size, size.forward_repeats, size.forward_warmup)
    rows: list[dict[str, Any]] = []
    modes = [m for m in size.quant_modes if m != "gguf"] + [m for m in size.quant_modes if m == "gguf"]
    for i, mode in enumerate(modes):
        try:
            row = quantized_row(folder, mode, device, s, size.quant_steps, scratch, last=i == len(modes) - 1)
        except Exception as e:  # one mode failing is a result; the others still run
            row = {"mode": mode, "status": "failed", "error": _error_text(e)}
        release(device)
        rows.append(row)
        rec.update(modes=rows)


PARTS: dict[str, Callable[[SuiteSize, PartRecord, Path, Path], str | None]] = {
    "pytest": part_pytest,
    "attention": part_attention,
    "forward": part_forward,
    "train_step": part_train_step,
    "generate": part_generate,
    "quantization": part_quantization,
}


def _error_text(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} ({where})"[:600]


def run_part(name: str, path: Path, size_name: str, root: Path, scratch: Path) -> int:
    """Run one part in this process; its JSON says ok or failed (and why)."""
    size = SIZES[size_name]
    if size.device == "cpu":
        import torch

        torch.set_num_threads(1)  # the dry run shares a small machine; threads only add contention
    rec = PartRecord(name, path, size)
    try:
        error = PARTS[name](size, rec, root, scratch)
    except Exception as e:
        traceback.print_exc()
        rec.finish("failed", _error_text(e))
        return 1
    rec.finish("failed" if error else "ok", error)
    return 1 if error else 0
