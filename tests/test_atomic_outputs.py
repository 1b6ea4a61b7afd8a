"""Outputs survive crashes: an image and its sidecar as one unit, durable renames, one file mode."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from musar.errors import MusarError
from musar.utils import io as musar_io
from musar.utils.io import atomic_path, file_mode, write_image_and_sidecar


class Crash(BaseException):
    """Stands for the process dying: nothing in the writer may catch it."""


def write_pair(folder: Path, colour: tuple[int, int, int], **extra: Any) -> None:
    write_image_and_sidecar(
        folder / "p.png", lambda tmp: Image.new("RGB", (8, 8), colour).save(tmp, format="PNG"),
        {"colour": list(colour), **extra},
    )


def pair_state(folder: Path) -> str:
    """'none', or the colour of the image, after checking the sidecar beside it is its own."""
    image, sidecar = folder / "p.png", folder / "p.json"
    if not image.exists():
        return "none"
    assert sidecar.is_file(), "an image without its sidecar"
    record = json.loads(sidecar.read_text())
    assert record["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest(), "an image beside another's sidecar"
    assert list(Image.open(image).getpixel((0, 0))) == record["colour"]
    return str(record["colour"])


OLD, NEW = (10, 20, 30), (200, 100, 0)


def crash_on_call(monkeypatch: pytest.MonkeyPatch, name: str, n: int) -> None:
    """Make the n-th call of os.<name> (from musar.utils.io) die."""
    real = getattr(os, name)
    calls = {"n": 0}

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"killed at os.{name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(musar_io.os, name, dying)


@pytest.mark.parametrize("point", [
    "encoding the image",
    "before the old image is removed",
    "before the sidecar is renamed",
    "before the image is renamed",
    "before the folder is synced",
])
def test_a_crash_at_any_point_leaves_no_image_beside_a_foreign_sidecar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    write_pair(tmp_path, OLD)
    assert pair_state(tmp_path) == str(list(OLD))

    def encode(tmp: Path) -> None:
        raise Crash("killed while encoding")

    if point == "before the old image is removed":
        real_unlink = Path.unlink

        def unlink(self: Path, *args: Any, **kwargs: Any) -> None:
            if self.name == "p.png":
                raise Crash("killed before removing the old image")
            real_unlink(self, *args, **kwargs)

        monkeypatch.setattr(Path, "unlink", unlink)
    elif point == "before the sidecar is renamed":
        crash_on_call(monkeypatch, "replace", 1)
    elif point == "before the image is renamed":
        crash_on_call(monkeypatch, "replace", 2)
    elif point == "before the folder is synced":
        crash_on_call(monkeypatch, "fsync", 3)  # image file, sidecar file, then the folder
    with pytest.raises(Crash):
        if point == "encoding the image":
            write_image_and_sidecar(tmp_path / "p.png", encode, {"colour": list(NEW)})
        else:
            write_pair(tmp_path, NEW)
    monkeypatch.undo()
    # Old pair, no image, or the new pair: never an image with the wrong sidecar (or none).
    assert pair_state(tmp_path) in {str(list(OLD)), "none", str(list(NEW))}
    if point in ("encoding the image", "before the old image is removed"):
        assert pair_state(tmp_path) == str(list(OLD))  # nothing was replaced yet
    write_pair(tmp_path, NEW)  # and the next run repairs whatever the crash left
    assert pair_state(tmp_path) == str(list(NEW))


def test_sidecars_are_strict_json_and_a_nan_changes_nothing(tmp_path: Path) -> None:
    write_pair(tmp_path, OLD)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="JSON"):
        write_pair(tmp_path, NEW, guidance=float("nan"))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_folder_where_the_sidecar_goes_fails_before_the_old_image_is_touched(tmp_path: Path) -> None:
    (tmp_path / "p.png").write_bytes(b"old image")
    (tmp_path / "p.json").mkdir()
    with pytest.raises(MusarError, match="output path is a folder"):
        write_pair(tmp_path, NEW)
    assert (tmp_path / "p.png").read_bytes() == b"old image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.png"]


def test_atomic_path_syncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(musar_io.os, "fsync", fsync)
    monkeypatch.setattr(musar_io.os, "replace", replace)
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        # A writer that recreates its file with its own mode, as safetensors does.
        tmp.unlink()
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"payload")
        os.close(fd)
    monkeypatch.undo()
    assert events == ["fsync-file", "replace", "fsync-dir"]
    assert target.read_bytes() == b"payload"
    assert target.stat().st_mode & 0o777 == file_mode()
    assert not [p for p in tmp_path.iterdir() if p != target]


def test_check_writable_creates_nothing(tmp_path: Path) -> None:
    from musar.utils.io import check_writable

    check_writable(tmp_path / "a" / "b" / "c.png")
    assert list(tmp_path.iterdir()) == []
