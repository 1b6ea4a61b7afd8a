"""Checkpoints on resume: every file validated, `latest` falls back to the newest valid one, a run
past max_steps is refused before any model loads, and every file has the one common mode."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from musar.errors import MusarError
from musar.train import Trainer, train
from musar.train.checkpoint import MANIFEST_FILE, find_resume, validate_checkpoint
from musar.utils.io import file_mode

from train_fixtures import tiny_config

STEP2, STEP4 = "step_00000002", "step_00000004"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 tiny steps, checkpoints at 2 and 4, all kept."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny_config(out, "max_steps=4", "checkpoint_every=2", "keep_last=0", "validate_every=0"))
    return out


@pytest.fixture
def copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


def garbage(path: Path) -> None:
    path.write_bytes(b'{"half a file')


def flip_last_byte(path: Path) -> None:  # same size, header intact: only the manifest's hash sees it
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def clobber_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


# (file of the newest checkpoint, damage, text the one-line error names)
DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    ("lora.safetensors", truncate, "lora.safetensors is truncated"),
    ("lora.safetensors", clobber_header, "lora.safetensors is not a safetensors file"),
    ("optimizer.safetensors", truncate, "optimizer.safetensors is truncated"),
    ("optimizer.safetensors", flip_last_byte, "optimizer.safetensors differs from what was saved"),
    ("optimizer.json", garbage, "optimizer.json is not readable JSON"),
    ("scheduler.json", delete, "scheduler.json is missing"),
    ("rng_rank0.json", garbage, "rng_rank0.json is not readable JSON"),
    ("rng_rank0.safetensors", truncate, "rng_rank0.safetensors is truncated"),
    ("trainer.json", garbage, "trainer.json is not readable JSON"),
    (MANIFEST_FILE, garbage, f"{MANIFEST_FILE} is not readable JSON"),
]


@pytest.mark.parametrize(("name", "damage", "message"), DAMAGE, ids=[f"{n}-{d.__name__}" for n, d, _ in DAMAGE])
def test_each_damaged_file_is_named_and_latest_falls_back(
    copy: Path, name: str, damage: Callable[[Path], None], message: str
) -> None:
    newest = copy / "checkpoints" / STEP4
    damage(newest / name)
    with pytest.raises(MusarError) as err:
        validate_checkpoint(newest)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MusarError, match="is damaged"):
        find_resume(copy, str(newest))  # a folder named by the user: no fallback
    point = find_resume(copy, "latest")
    assert point.path.name == STEP2 and point.step == 2
    assert len(point.skipped) == 1 and point.skipped[0].startswith(f"{STEP4} (") and message in point.skipped[0]


def test_a_checkpoint_without_a_manifest_is_refused_and_latest_falls_back(copy: Path) -> None:
    """Every checkpoint is sealed with a manifest: a folder without one (every other file intact)
    is damaged, and ``latest`` resumes from the older, sealed checkpoint instead."""
    newest = copy / "checkpoints" / STEP4
    (newest / MANIFEST_FILE).unlink()
    with pytest.raises(MusarError) as err:
        validate_checkpoint(newest)
    assert f"{MANIFEST_FILE} is missing" in str(err.value) and "\n" not in str(err.value)
    point = find_resume(copy, "latest")
    assert point.path.name == STEP2 and point.step == 2
    assert len(point.skipped) == 1 and point.skipped[0].startswith(f"{STEP4} (")
    assert f"{MANIFEST_FILE} is missing" in point.skipped[0]


def test_no_valid_checkpoint_at_all(copy: Path) -> None:
    for folder in (copy / "checkpoints").iterdir():
        truncate(folder / "optimizer.safetensors")
    with pytest.raises(MusarError, match=r"no valid checkpoint .*; 2 damaged, the newest: step_00000004"):
        find_resume(copy, "latest")


def test_resume_latest_skips_the_damaged_checkpoint_says_so_and_matches_the_run(
    copy: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncate(copy / "checkpoints" / STEP4 / "optimizer.safetensors")
    result = train(tiny_config(copy, "max_steps=4", "checkpoint_every=2", "keep_last=0", "validate_every=0"),
                   resume="latest")
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {STEP4} (optimizer.safetensors is truncated" in err
    assert f"resuming from {STEP2}, the newest valid checkpoint" in err
    assert result.state.step == 4
    assert validate_checkpoint(copy / "checkpoints" / STEP4)["step"] == 4  # rewritten, whole again
    a, b = load_file(str(run / "lora.safetensors")), load_file(str(result.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_past_max_steps_is_refused_before_any_model_loads(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built")

    monkeypatch.setattr("musar.train.loop.build_components", no_model)
    with pytest.raises(MusarError, match=f"{STEP4} is at step 4, past max_steps 2: raise --max-steps above 4"):
        Trainer(tiny_config(copy, "max_steps=2"), resume="latest")


def test_one_file_mode_and_a_manifest_of_every_file(run: Path) -> None:
    for folder in (run / "checkpoints").iterdir():
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        assert {p.stat().st_mode & 0o777 for p in files} == {file_mode()}, folder
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        assert set(manifest["files"]) == {p.name for p in files} - {MANIFEST_FILE}
    assert (run / "lora.safetensors").stat().st_mode & 0o777 == file_mode()
