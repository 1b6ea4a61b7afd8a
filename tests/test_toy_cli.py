"""``musar toy`` refuses bad numbers at once: exit 2, one line naming the option, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from musar.cli import main


@pytest.mark.parametrize(("argv", "says"), [
    (["toy", "all", "--jobs", "0"], "--jobs: must be between 1 and 64, got 0"),
    (["toy", "report", "--jobs", "-1"], "--jobs: must be between 1 and 64, got -1"),
    (["toy", "report", "--threads", "0"], "--threads: must be between 1 and 1024, got 0"),
    (["toy", "report", "--cases", "0"], "--cases: must be >= 1, got 0"),
    (["toy", "data", "--pairs", "x"], "--pairs: not an integer: 'x'"),
    (["toy", "demo", "--seed", "-5"], "--seed: must be between 0 and"),
])
def test_bad_numbers_are_refused_before_any_work(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()
