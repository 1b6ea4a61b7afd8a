"""The GPU suite (bench/gpu_check.sh) cannot rot: its dry run executes every part at tiny sizes
on the CPU, and its orchestration (time boxes, budget, failures, targets) is checked here."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musar.bench import parts as suite_parts
from musar.bench.suite import PARTS, run_suite, suite_values, warm_start
from musar.bench.targets import judge

REPO = Path(__file__).resolve().parents[1]
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_dry_run_writes_every_part(tmp_path: Path) -> None:
    """The exact command a GPU session runs, with --dry-run: every part runs and writes its JSON."""
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--dry-run"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # What comes back from a device run: at most 8 files, one folder deep.
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{p}.json" for p in PARTS), "summary.json", "suite.log"])
    data = {p: _json(out / f"{p}.json") for p in PARTS}
    for name, d in data.items():
        assert d["schema"] == "musar.bench.suite/1" and d["part"] == name and d["size"] == "tiny"
        assert d["status"] == "ok" and d["error"] is None and d["meta"]["device"] == "cpu", name
        # the parent's clock holds the part's own, and an ok part ended inside its box
        assert 0 < d["part_s"] <= d["wall_s"] < d["box_s"] + 1, name
    res = {p: d["results"] for p, d in data.items()}
    tests, counts = res["pytest"]["tests"], res["pytest"]["counts"]
    assert res["pytest"]["exit_code"] == 0 and tests and sum(counts.values()) == len(tests)
    assert counts["FAILED"] == counts["ERROR"] == 0
    if not torch.cuda.is_available():
        assert counts["SKIPPED"] == len(tests)  # conftest skips every GPU test without CUDA
    assert "tests/test_quantization.py" in res["pytest"]["files"]
    # tiny: 16 prompt + 16 noise tokens, and per reference 4 phrase + 4 image tokens
    assert [(a["c"], a["L"]) for a in res["attention"]["attention"]] == [(0, 32), (2, 48)]
    att = res["attention"]["attention"][1]
    unmasked = {n: t for n, t in att["ms"].items() if n.startswith("sdpa_") and n != "sdpa_math"}
    assert att["fastest_unmasked"] == min(unmasked, key=unmasked.__getitem__)
    assert att["ratio_vs_fastest_unmasked"]["routed_fast"] == pytest.approx(att["ms"]["routed_fast"] / min(unmasked.values()))
    modes = {(r["c"], r["mode"]) for r in res["forward"]["forward"]}
    assert {(0, "plain"), (2, "naive"), (2, "reference"), (2, "fast"), (2, "static_only"), (2, "cached")} <= modes
    assert {r["variant"] for r in res["train_step"]["rows"]} == {"plain", "concat", "musar"}
    assert res["train_step"]["meta"]["attention"] == "flash"
    gen = res["generate"]["generate"]
    # the phases add up inside the call (timings are rounded to 0.1 ms), the call inside the wall time
    assert gen["steps"] == 2 and gen["encode_s"] + gen["denoise_s"] <= gen["total_s"] + 2e-4 <= gen["seconds"] + 4e-4
    rows = {r["mode"]: r for r in res["quantization"]["modes"]}
    assert list(rows) == ["none", "nf4", "int8wo", "fp8wo", "gguf"]
    none = rows["none"]
    assert none["status"] == "ok" and none["generate"]["steps"] == 1
    assert none["forward_ms"] == statistics.median(none["forward_ms_all"])  # the median of what was timed
    # unquantised: the saved and reloaded pipeline holds exactly the weights the generate part built
    assert none["weights_gib"] == pytest.approx(res["generate"]["weights_gib"])
    assert rows["nf4"]["status"] == "skipped" and ("CUDA" in rows["nf4"]["reason"] or "bitsandbytes" in rows["nf4"]["reason"])
    if HAS_TORCHAO:
        for mode in ("int8wo", "fp8wo"):
            assert rows[mode]["status"] == "ok"
            assert rows[mode]["weights_gib"]["transformer"] < 0.5 * rows["none"]["weights_gib"]["transformer"]
    summary = _json(out / "summary.json")
    assert summary["order"] == list(PARTS) and all(p["status"] == "ok" for p in summary["parts"].values())
    step = {r["variant"]: r["s_per_step"] for r in res["train_step"]["rows"]}
    assert summary["targets"]["train_step_musar_vs_concat"]["value"] == pytest.approx(step["musar"] / step["concat"])
    assert all(t["met"] is None for n, t in summary["targets"].items() if n != "note")  # never judged on CPU
    report = subprocess.run([sys.executable, "-m", "musar.bench.suite", "--report", str(out)], env=_env(),
                            capture_output=True, text=True, check=True).stdout
    assert "| quantization | ok |" in report and "### forward" in report


def test_time_box_stops_a_part_and_the_next_one_runs(tmp_path: Path) -> None:
    """With --spawn (fresh interpreters: the path the suite falls back to), so both ways of
    starting a part are exercised (the dry run above forks)."""
    proc = subprocess.run([sys.executable, "-m", "musar.bench.suite", str(tmp_path), "--dry-run", "--spawn",
                           "--parts", "attention", "forward", "--box", "attention=0.01"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    att, fwd = _json(tmp_path / "attention.json"), _json(tmp_path / "forward.json")
    assert att["status"] == "timeout" and "time box" in att["error"] and att["exit_code"] is None
    assert fwd["status"] == "ok" and fwd["results"]["forward"]
    assert _json(tmp_path / "summary.json")["parts"]["attention"]["status"] == "timeout"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where no CUDA kernel can run")
def test_a_gpu_run_without_a_usable_gpu_falls_back_to_fresh_interpreters() -> None:
    assert warm_start(cuda=True) is False  # the forked probe could not run a CUDA kernel
    assert warm_start(cuda=False) is True  # the dry run forks


def test_parts_without_budget_are_skipped_not_started(tmp_path: Path) -> None:
    assert run_suite(tmp_path, ["attention", "forward"], dry_run=True, budget_s=10, spawn=True) == 1
    for name in ("attention", "forward"):
        d = _json(tmp_path / f"{name}.json")
        assert d["status"] == "skipped" and d["error"].startswith("out of budget") and d["results"] == {}


def test_a_failing_part_records_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(suite_parts.PARTS, "attention", broken)
    assert suite_parts.run_part("attention", tmp_path / "a.json", "tiny", REPO, tmp_path) == 1
    d = _json(tmp_path / "a.json")
    assert d["status"] == "failed" and d["error"].startswith("RuntimeError: CUDA error: an illegal memory access")


def test_targets_from_parts_are_judged_on_cuda_only() -> None:
    forward = [{"c": 0, "mode": "plain", "ms": 100.0}, {"c": 2, "mode": "naive", "ms": 150.0, "peak_mib": 1000.0},
               {"c": 2, "mode": "flex", "ms": 120.0, "peak_mib": 1010.0}, {"c": 2, "mode": "static_only", "ms": 118.0},
               {"c": 2, "mode": "cached", "ms": 105.0}]
    attention = [{"c": 2, "ratio_vs_fastest_unmasked": {"routed_flex": 1.2}}]
    parts = {
        "forward": {"results": {"forward": forward, "auto_backend": "flex"}},
        "attention": {"results": {"attention": attention}},
        "train_step": {"results": {"rows": [{"variant": "concat", "s_per_step": 1.0, "peak_gib": 25.0},
                                            {"variant": "musar", "s_per_step": 1.05, "peak_gib": 26.0}]}},
        "generate": {"results": {"generate": {"steps": 28, "seconds": 6.5}}},
        "quantization": {"results": {"modes": [
            {"mode": "none", "status": "ok", "generate": {"peak_gb": 40.0}},
            {"mode": "int8wo", "status": "ok", "generate": {"peak_gb": 22.0}},
            {"mode": "nf4", "status": "ok", "generate": {"peak_gb": 14.5}},
            {"mode": "gguf", "status": "failed", "error": "x"}]}},
    }
    values = suite_values(parts)
    assert values["forward_auto_vs_naive_c2"] == pytest.approx(0.8)
    assert values["dynamic_routing_overhead_c2"] == pytest.approx(120 / 118 - 1)
    assert values["train_step_musar_vs_concat"] == pytest.approx(1.05)
    assert values["train_step_musar_peak_gb"] == pytest.approx(26 * 2**30 / 1e9)
    assert values["quantized_pipeline_peak_gb"] == 14.5 and values["forward_fast_vs_naive_c2"] is None
    cuda = judge(values, cuda=True)
    assert cuda["forward_auto_vs_naive_c2"]["met"] is True and cuda["attention_routed_vs_fastest_unmasked_c2"]["met"] is False
    assert cuda["generate_28_steps_1024_c2_s"]["met"] is False and cuda["quantized_pipeline_peak_gb"]["met"] is True
    assert cuda["forward_fast_vs_naive_c2"]["met"] is None  # not measured: no verdict
    assert all(t["met"] is None for n, t in judge(values, cuda=False).items() if n != "note")
