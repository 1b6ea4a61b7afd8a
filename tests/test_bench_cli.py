"""What ``musar bench`` and ``python -m musar.bench.train_step`` print and write (issue 24): no
file unless asked, a median with its spread on every timed row, rows only for what ran, a
progress bar on a terminal, and one naming of presets and output flags across the bench commands."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from musar.bench.targets import format_targets, judge
from musar.cli import main

TINY = ["bench", "--preset", "tiny", "--device", "cpu", "--refs", "0", "2", "--repeats", "3", "--warmup", "0",
        "--threads", "1"]
TIMED = re.compile(r"^\s*(?:\d+\s+)?(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\*?\s")  # name median min max n


class _Terminal(io.StringIO):
    def isatty(self) -> bool:  # tqdm draws its bar only on a terminal
        return True


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --threads 1 sets it for the whole process


def _timed_lines(text: str) -> dict[str, tuple[float, float, float, int]]:
    rows = {}
    for line in text.splitlines():
        m = TIMED.match(line)
        if m and not line.startswith("target"):
            rows[m[1]] = (float(m[2]), float(m[3]), float(m[4]), int(m[5]))
    return rows


def test_no_out_prints_writes_nothing_and_shows_only_what_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    monkeypatch.chdir(tmp_path)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([*TINY, "--modes", "fast"]) == 0
    assert list(tmp_path.iterdir()) == []  # no --out: nothing written, not even a default file
    out, err = capsys.readouterr().out, terminal.getvalue()
    assert "printed only, nothing written" in err
    assert "musar bench" in err and "forward c=2 fast" in err  # the bar, naming what runs
    rows = _timed_lines(out)
    # only fast ran: no plain row at c = 0 (it was not asked for), no naive, no cached, no flex
    forward = [ln.split()[1] for ln in out.splitlines() if re.match(r"^\s*\d+ \w+\s+[\d.]+", ln)]
    assert forward == ["fast"]
    assert "flex_block_mask" not in rows and "flex blocks" not in out  # flex did not run
    assert {"sdpa_default", "routed_fast", "affinity"} <= rows.keys() and "routed_reference" not in rows
    for name, (median, lo, hi, n) in rows.items():
        assert lo <= median <= hi and n == 3, name
    assert "peak MiB" not in out  # not measured on a CPU: no column of dashes
    # targets this run could not measure are named once, not printed as rows of dashes
    assert "target forward_auto_vs_naive_c2" not in out and "target attention_routed_vs_fastest_unmasked_c2" in out
    missing = next(ln for ln in out.splitlines() if ln.startswith("not measured in this run:"))
    assert "forward_auto_vs_naive_c2" in missing and "attention_routed_vs_fastest_unmasked_c4" in missing
    assert "not judged on CPU" in out


def test_out_json_has_median_and_spread_on_every_timed_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "b.json"
    assert main([*TINY, "--modes", "plain", "naive", "fast", "cached", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["c"], r["mode"]) for r in data["forward"]] == [(0, "plain"), (2, "naive"), (2, "fast"), (2, "cached")]
    for r in data["forward"]:
        assert r["n"] == len(r["ms_all"]) == 3 and r["ms_min"] <= r["ms"] <= r["ms_max"], r["mode"]
        assert r["ms"] == sorted(r["ms_all"])[1] and 0 <= r["ms_iqr"] <= r["ms_max"] - r["ms_min"]
    for a in data["attention"]:
        assert a["spread"].keys() == a["ms"].keys()
        for name, sp in a["spread"].items():
            assert sp["ms"] == a["ms"][name] and sp["n"] == 3 and sp["ms_min"] <= sp["ms"] <= sp["ms_max"]
        assert "flex_block_mask" not in a["ms"] and "block_kept_fraction" not in a  # no flex on this CPU run
    assert 0 < data["attention"][1]["kept_fraction"] < 1  # the routes' share, whatever the backend
    printed = _timed_lines(capsys.readouterr().out)
    assert {"plain", "naive", "fast", "cached", "sdpa_default", "routed_fast"} <= printed.keys()


def test_old_preset_name_is_one_clear_argparse_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset", "flux-dev"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "musar bench: error: argument --preset: preset 'flux-dev' is now called 'flux-dev-random'"


@pytest.mark.parametrize(("argv", "says"), [
    (["--json", "x.json"], "--json is now --out"),
    (["--preset", "flux-dev"], "preset 'flux-dev' is now called 'flux-dev-random'"),
])
def test_train_step_old_spellings_are_one_clear_argparse_line(
    argv: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from musar.bench.train_step import main as train_step

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train_step(argv)
    assert e.value.code == 2 and list(tmp_path.iterdir()) == []
    assert says in capsys.readouterr().err.strip().splitlines()[-1]


def test_train_step_takes_the_bench_preset_names() -> None:
    from musar.bench.parts import SIZES
    from musar.bench.settings import PRESETS
    from musar.bench.train_step import SHAPES

    assert set(SHAPES) == set(PRESETS) == {"flux-dev-random", "tiny"}
    assert {s.train_preset for s in SIZES.values()} <= set(PRESETS)
    assert {s.bench_preset for s in SIZES.values()} <= set(PRESETS)


def _row(variant: str, s: float, peak: float | None) -> dict[str, object]:
    return {"variant": variant, "s_per_step": s, "s_min": s * 0.9, "s_max": s * 1.2, "n": 5, "peak_gib": peak}


def test_train_step_report_shows_spread_and_judges_only_on_cuda() -> None:
    from musar.bench.train_step import report

    rows = [_row("plain", 1.0, None), _row("concat", 1.2, None), _row("musar", 1.5, None)]
    cpu = report(rows, None, cuda=False)
    assert "target train_step_musar_vs_concat" in cpu and "not judged on CPU" in cpu and "MISSED" not in cpu
    assert "peak GiB" not in cpu and "MFU" not in cpu.splitlines()[1]  # unmeasured columns are left out
    assert "not measured in this run: train_step_musar_peak_gb" in cpu
    line = next(ln for ln in cpu.splitlines() if ln.startswith("musar"))
    assert line.split()[1:5] == ["1.500", "1.350", "1.800", "5"]  # median, min, max, n
    gpu = report([_row("plain", 1.0, 20.0), _row("concat", 1.2, 22.0), _row("musar", 1.5, 23.0)], None, cuda=True)
    assert "MISSED" in gpu and "not judged" not in gpu and "peak GiB" in gpu


def test_targets_print_the_same_words_everywhere() -> None:
    values = {"cached_vs_plain_c2": 1.05, "forward_auto_vs_naive_c2": 0.95, "peak_memory_vs_naive_c2": None}
    gpu = format_targets(judge(values, True), cuda=True)
    assert gpu[0].endswith("MISSED") and gpu[1].endswith("met")  # auto/naive 0.95 > 0.9; cached/plain 1.05 <= 1.1
    assert gpu[2] == "not measured in this run: peak_memory_vs_naive_c2"
    cpu = format_targets(judge(values, False), cuda=False)
    assert all(ln.endswith("not judged on CPU") for ln in cpu[:2]) and cpu[-1].startswith("CPU run:")


def test_suite_report_prints_the_spread_beside_every_median(tmp_path: Path) -> None:
    from musar.bench.report import format_report

    row = {"c": 2, "mode": "flex", "ms": 120.0, "ms_min": 118.5, "ms_max": 211.0, "n": 3, "ratio_vs_plain": 1.2}
    (tmp_path / "forward.json").write_text(json.dumps({"results": {"forward": [row]}}))
    step = {"variant": "musar", "s_per_step": 1.5, "s_min": 1.4, "s_max": 1.9, "n": 5}
    (tmp_path / "train_step.json").write_text(json.dumps({"results": {"rows": [step]}}))
    text = format_report(tmp_path)
    assert "| 2 | flex | 120.00 | 118.50 | 211.00 | 3 | 1.20 |" in text
    assert "| musar | 1.500 | 1.400 | 1.900 | 5 |" in text
