"""The report files of an evaluation run from hand-made rows (no DreamBench, no models)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from musar.eval.report import ImageRow, write_report


def _strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path.name} holds {token}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_degenerate_metric_values_are_missing_not_nan(tmp_path: Path, bad: float) -> None:
    rows = [
        ImageRow("a", seed=0, dino=0.5, clip_i=bad, clip_t=30.0, dino_per_subject=(0.5,), clip_i_per_subject=(bad,)),
        ImageRow("a", seed=1, dino=bad, clip_i=bad, clip_t=32.0, dino_per_subject=(bad,), clip_i_per_subject=(bad,)),
        ImageRow("b", seed=0, dino=0.7, clip_i=bad, clip_t=28.0, dino_per_subject=(0.7,), clip_i_per_subject=(bad,)),
    ]
    summary = write_report(tmp_path, rows, {"model": "fake", "guidance": 3.5})
    on_disk = _strict_json(tmp_path / "summary.json")
    assert on_disk["metrics"] == json.loads(json.dumps(summary["metrics"]))
    single = on_disk["metrics"]["single"]
    # The NaN image is left out of case a's mean: (0.5 + 0.7) / 2 over two cases, 2 images scored.
    assert single["dino"]["mean"] == pytest.approx(0.6) and single["dino"]["n_images"] == 2
    assert "clip_i" not in single  # no finite value at all: no statistic (the table shows "–")
    assert single["clip_t"]["n_images"] == 3
    with (tmp_path / "cases.csv").open() as f:
        cells = list(csv.DictReader(f))
    assert [c["dino"] for c in cells] == ["0.500000", "", "0.700000"]
    assert {c["clip_i"] for c in cells} == {""} and cells[1]["dino_per_subject"] == ""
    assert "| fake | 0.600 ± " in (tmp_path / "table.md").read_text() and "nan" not in (tmp_path / "table.md").read_text()


def test_a_full_disk_mid_report_changes_none_of_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from musar.utils import io as musar_io

    rows = [ImageRow("a", seed=0, dino=0.5, clip_i=0.6, clip_t=30.0, dino_per_subject=(0.5,), clip_i_per_subject=(0.6,))]
    write_report(tmp_path, rows, {"model": "fake", "guidance": 3.5})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real, calls = musar_io.finish_file, []

    def full_on_the_third(path: Path) -> None:  # cases.csv and summary.json staged, table.md fails
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path)

    monkeypatch.setattr(musar_io, "finish_file", full_on_the_third)
    more = [*rows, ImageRow("b", seed=0, dino=0.9, clip_i=0.9, clip_t=31.0, dino_per_subject=(0.9,), clip_i_per_subject=(0.9,))]
    with pytest.raises(OSError):
        write_report(tmp_path, more, {"model": "fake", "guidance": 3.5})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no file changed, no temporary left
