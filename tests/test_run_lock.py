"""One process per run folder (issue 22, item 4): an exclusive flock that names its holder, goes
away with its holder however it ends, and makes a second `musar train` exit 2 without touching
the first run's outputs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lock_holder import lock_held_elsewhere
from musar.errors import MusarError
from musar.train.config import dump_config
from musar.utils import run_lock

from train_fixtures import REPO, tiny_config


def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _try_lock(folder: Path) -> subprocess.CompletedProcess[str]:
    return _python(f"""
        from musar.utils import run_lock
        try:
            run_lock.acquire({str(folder)!r}, "training run")
        except run_lock.FolderInUse as e:
            print(e)
            raise SystemExit(2)
        print("acquired")
    """)


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != run_lock.LOCK_FILE}


def test_a_second_process_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    with run_lock.hold(tmp_path / "run", "training run") as lock:
        assert lock.held
        holder = run_lock.read_holder(tmp_path / "run")
        assert holder is not None and holder["pid"] == os.getpid() and holder["host"]
        done = _try_lock(tmp_path / "run")
        assert done.returncode == 2, done.stderr
        line = done.stdout.strip()
        assert "\n" not in line and f"is in use by another training run (pid {os.getpid()} on " in line
        again = run_lock.acquire(tmp_path / "run")  # the same process: reentrant, not refused
        again.release()
        assert _try_lock(tmp_path / "run").returncode == 2  # still held by the outer hold
    assert _try_lock(tmp_path / "run").stdout.strip() == "acquired"  # released with the block


def test_the_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    with lock_held_elsewhere(tmp_path) as holder, pytest.raises(run_lock.FolderInUse, match=f"pid {holder.pid} "):
        run_lock.acquire(tmp_path)
    run_lock.acquire(tmp_path).release()  # SIGKILLed: no cleanup code ran, the kernel dropped the flock


def test_a_planted_lock_file_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / run_lock.LOCK_FILE).symlink_to(target)
    with pytest.raises(MusarError, match="cannot open the lock file"):
        run_lock.acquire(run)
    assert target.read_text() == "keep me"


def test_musar_train_exits_2_on_a_held_folder_and_leaves_the_run_intact(tmp_path: Path) -> None:
    from musar.train import train

    out = tmp_path / "run"
    cfg = tiny_config(out, "max_steps=2", "checkpoint_every=1", "validate_every=0")
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(cfg), encoding="utf-8")
    train(cfg)
    before = _snapshot(out)
    assert "lora.safetensors" in before and "checkpoints/step_00000002/manifest.json" in before
    with run_lock.hold(out, "training run"):
        for extra in ([], ["--resume", "latest", "--max-steps", "4"]):  # a fresh run and a resume alike
            done = subprocess.run(
                [sys.executable, "-m", "musar.cli", "train", "--config", str(config), *extra],
                capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert done.returncode == 2, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
            assert lines[0].startswith("musar train: error: ") and f"in use by another training run (pid {os.getpid()} " in lines[0]
            assert _snapshot(out) == before
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 2
