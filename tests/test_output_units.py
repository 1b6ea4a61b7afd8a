"""Outputs as units: no two outputs of a run share a path, multi-file outputs change together
(a full disk changes none of them), and concurrent writers never cross an image and a sidecar."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from musar.cli import main
from musar.utils import io as musar_io
from musar.utils.io import write_unit

PROMPT = "a corgi and a red backpack on the beach"
FAST = ["--preset", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--condition-size", "32"]


@pytest.fixture
def refs(tmp_path: Path) -> list[str]:
    paths = []
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 200, 30))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    return paths


def _generate(refs: list[str], out: Path, maps: Path, seed: int = 0) -> int:
    return main(["generate", "--prompt", PROMPT, "--subject", refs[0], "a corgi", "--subject", refs[1], "a red backpack",
                 *FAST, "--seed", str(seed), "--out", str(out), "--routing-maps", str(maps)])


def _one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["image is a map", "sidecar is routing.json", "through a symlink"])
def test_colliding_outputs_are_refused_before_the_model_loads(
    tmp_path: Path, refs: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    import musar.pipelines.presets as presets

    monkeypatch.setattr(presets, "load_pipeline", lambda **kw: pytest.fail("the model was loaded"))
    maps = tmp_path / "maps"
    out = {"image is a map": maps / "routing_grid.png", "sidecar is routing.json": maps / "routing.png",
           "through a symlink": tmp_path / "link" / "route_overlay.png"}[layout]
    if layout == "through a symlink":
        maps.mkdir()
        (tmp_path / "link").symlink_to(maps)
    capsys.readouterr()
    assert _generate(refs, out, maps) == 2
    line = _one_error(capsys.readouterr().err)
    assert "argument --routing-maps:" in line and "would be written twice in one run" in line, line
    assert not maps.exists() or not list(maps.iterdir())


def test_maps_beside_the_image_are_fine_and_match_the_planned_files(tmp_path: Path, refs: list[str]) -> None:
    from musar.cli.generate import ROUTING_MAP_FILES

    assert _generate(refs, tmp_path / "out" / "x.png", tmp_path / "out") == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"x.png", "x.json", *ROUTING_MAP_FILES}


# finish_file runs once per staged file, in this order: the three maps, then the image, its sidecar.
STAGES = {"routing_grid.png": 1, "routing.json": 3, "image": 4, "sidecar": 5}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_full_disk_mid_write_exits_1_and_changes_nothing(
    tmp_path: Path, refs: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    out, maps = tmp_path / "out" / "x.png", tmp_path / "out" / "maps"
    assert _generate(refs, out, maps, seed=1) == 0
    before = _snapshot(tmp_path / "out")
    real, calls = musar_io.finish_file, {"n": 0}

    def full(path: Any) -> None:
        calls["n"] += 1
        if calls["n"] == STAGES[stage]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path)

    monkeypatch.setattr(musar_io, "finish_file", full)
    capsys.readouterr()
    assert _generate(refs, out, maps, seed=2) == 1
    assert "no space left on device" in _one_error(capsys.readouterr().err)
    assert _snapshot(tmp_path / "out") == before, "earlier outputs intact"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "no temporary file left"


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """A 4 MiB tmpfs, mounted for this test (root only: CI runs as root), unmounted after."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'}); "
                    "the ENOSPC tests above raise the same OSError where a write would")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    """Write until the file system refuses one more byte (64 KiB blocks, then single bytes)."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for block in (65536, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as e:
                assert e.errno == errno.ENOSPC


def test_on_a_real_full_file_system(small_fs: Path, refs: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out, maps = small_fs / "out" / "p.png", small_fs / "out" / "maps"
    assert _generate(refs, out, maps, seed=1) == 0
    before = _snapshot(small_fs / "out")
    _fill(small_fs)
    capsys.readouterr()
    assert _generate(refs, out, maps, seed=2) == 1  # a different image: every file would change
    assert "no space left on device" in _one_error(capsys.readouterr().err)
    assert _snapshot(small_fs / "out") == before, "earlier outputs intact"
    left = [p.name for p in small_fs.rglob("*") if p.is_file() and p.name != "filler"]
    assert sorted(left) == sorted(Path(k).name for k in before), f"no temporary file left: {left}"


def test_a_unit_changes_all_files_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from musar.toy import demo

    demo.write_examples(tmp_path)
    before = _snapshot(tmp_path)

    def full(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_unit({tmp_path / "ref_a.png": lambda p: p.write_bytes(b"new"), tmp_path / "demo.json": full})
    monkeypatch.setattr(demo, "json_writer", lambda obj: full)
    with pytest.raises(OSError, match="No space"):
        demo.write_examples(tmp_path)
    assert _snapshot(tmp_path) == before and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    write_unit({tmp_path / "ref_a.png": lambda p: p.write_bytes(b"new"), tmp_path / "demo.json": lambda p: p.write_text("{}")})
    assert (tmp_path / "ref_a.png").read_bytes() == b"new" and (tmp_path / "demo.json").read_text() == "{}"


WRITER = """
import hashlib, json, sys
from pathlib import Path
from PIL import Image
from musar.utils.io import folder_lock, write_image_and_sidecar
target, tag, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(rounds):
    colour = (tag * 100, i % 256, 7)
    write_image_and_sidecar(target, lambda t: Image.new("RGB", (16, 16), colour).save(t, format="PNG"),
                            {"writer": tag, "round": i})
    with folder_lock(target.parent):  # no writer is between its renames now
        record = json.loads(target.with_suffix(".json").read_text())
        if record["image_sha256"] != hashlib.sha256(target.read_bytes()).hexdigest():
            sys.exit(f"writer {tag} round {i}: an image beside another writer's sidecar")
"""


def test_two_processes_writing_one_pair_never_cross(tmp_path: Path) -> None:
    target = tmp_path / "pair.png"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(tag), "100"], env=env,
                              stderr=subprocess.PIPE, text=True) for tag in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    record = json.loads(target.with_suffix(".json").read_text())
    assert record["image_sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair.json", "pair.png"], "no lock or temporary file left"
