"""The toy report in units (musar.toy.report_parts): side by side it gives the numbers one process
gives, and a stopped or stale report recomputes only what is missing or out of date."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lock_holder import lock_held_elsewhere
from musar.toy import model as toy_model
from musar.toy.report import run_report
from musar.utils.io import file_sha256

pytestmark = pytest.mark.skipif(not (toy_model.SHIPPED_BASE / "model_index.json").is_file(),
                                reason="the toy base is not shipped")
ROWS = ["codec", "full", "three"]
SMALL = {"rows": ROWS, "cases": 2, "seeds": (0,), "gate_cases": (2, 2), "threads": 1}


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(toy_model.SHIPPED_BASE, out / "base")
    (out / "musar" / "full").mkdir(parents=True)
    shutil.copyfile(toy_model.SHIPPED_LORA, out / "musar" / "full" / "lora.safetensors")
    return out


def _numbers(results: dict) -> dict:
    return {k: (v.get("rates"), v.get("verdicts")) if "label" in v else v for k, v in results.items()}


def test_units_side_by_side_give_the_numbers_of_one_process(run_folder: Path, tmp_path: Path) -> None:
    one = run_report(run_folder, report_dir=tmp_path / "one", jobs=1, log=lambda _: None, **SMALL)
    two = run_report(run_folder, report_dir=tmp_path / "two", jobs=2, log=lambda _: None, **SMALL)
    assert _numbers(one) == _numbers(two)
    assert {p.name for p in (tmp_path / "two" / "parts").glob("*.json")} == {
        "codec.json", "full.full.json", "three.full.json", "base_gates.json"}
    assert (tmp_path / "one" / "report.md").read_text() == (tmp_path / "two" / "report.md").read_text()
    assert (tmp_path / "one" / "grid.png").read_bytes() == (tmp_path / "two" / "grid.png").read_bytes()


def test_a_stopped_or_stale_report_recomputes_only_what_it_must(run_folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "report"
    first = run_report(run_folder, report_dir=dest, log=lambda _: None, **SMALL)
    parts = dest / "parts"
    (parts / "three.full.json").unlink()  # stopped before this unit finished
    (parts / "codec.json").write_text('{"key": ')  # or cut short mid-write by a kill
    lines: list[str] = []
    again = run_report(run_folder, report_dir=dest, log=lines.append, **SMALL)
    assert _numbers(again) == _numbers(first)
    computed = sorted(line.split(":")[0] for line in lines if line.endswith("s)") and "training seed" not in line)
    assert computed == ["toy report codec", "toy report three.full"]
    assert "2 of 4 units already done" in " ".join(lines)

    lora = run_folder / "musar" / "full" / "lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        metadata = f.metadata()
    save_file({k: v * 0.5 for k, v in load_file(str(lora)).items()}, str(lora), metadata)  # retrained: new weights
    lines.clear()
    changed = run_report(run_folder, report_dir=dest, log=lines.append, **SMALL)
    computed = sorted(line.split(":")[0] for line in lines if line.endswith("s)") and "training seed" not in line)
    assert computed == ["toy report full.full", "toy report three.full"]  # the codec and gates did not read it
    key = json.loads((parts / "full.full.json").read_text())["key"]
    assert key["weights"]["musar/full/lora.safetensors"] == file_sha256(lora)
    assert changed["codec"]["rates"] == first["codec"]["rates"]


def test_a_second_report_into_the_same_folder_fails_at_once(run_folder: Path, tmp_path: Path) -> None:
    from musar.utils.run_lock import FolderInUse

    with lock_held_elsewhere(tmp_path / "report", "toy report"), pytest.raises(FolderInUse, match="in use by another"):
        run_report(run_folder, report_dir=tmp_path / "report", log=lambda _: None, **SMALL)
    assert not (tmp_path / "report" / "parts").exists()
