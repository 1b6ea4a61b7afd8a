"""Durable, atomic file output: nothing half-written is ever left under a final name.

Every file goes to a temporary name in its target folder, gets :func:`file_mode` (what a plain
``open()`` would give under the current umask, for every file we write, whatever library wrote
the bytes), is ``fsync``'d, renamed onto its final name, and the folder is ``fsync``'d so the
rename itself survives a power cut. :func:`write_image_and_sidecar` extends this to an image and
its JSON sidecar, which must never disagree (also when two writers race for one target), and
:func:`write_unit` to several files that must change together (routing maps, a demo's outputs).

A write that fails because the machine ran out of something (disk full, an I/O error) keeps its
``OSError``, so the CLI reports it as a runtime failure (exit 1); only a path the user got wrong
becomes a :class:`~musar.errors.MusarError` (exit 2).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from musar.errors import MusarError
from musar.utils.validation import check_output_files, sidecar_path


@functools.cache
def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask() would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The one mode of every file musar writes: ``0o666`` less the umask (usually 0644)."""
    return 0o666 & ~_umask()


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames and new entries in folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def finish_file(path: str | os.PathLike[str]) -> None:
    """Give a freshly written file the common mode and flush it to disk (before it is renamed)."""
    os.chmod(path, file_mode())
    fsync_file(path)


# errnos that say the machine, not the path, failed: they stay OSErrors (exit 1, "disk full").
_RUNTIME_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EROFS})


def _path_error(e: OSError, what: str) -> Exception:
    """The exception to raise for ``e``: the OSError itself where the machine failed, else one line."""
    if e.errno in _RUNTIME_ERRNOS:
        return e
    return MusarError(f"{what}: {e.strerror or e}")


def _temp_beside(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    except OSError as e:
        raise _path_error(e, f"cannot write to {path}") from None
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the same folder, so the final ``os.replace`` is atomic. The mode
    is set after the block (writers such as safetensors recreate the file with their own mode).
    """
    path = Path(path)
    tmp_path = _temp_beside(path)
    try:
        yield tmp_path
        finish_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_folder(path: str | os.PathLike[str], build: Callable[[Path], Any]) -> Path:
    """Call ``build(staging)`` on a fresh folder beside ``path`` and swap it in by renames.

    An interrupted build leaves the old folder whole; between the two renames the old one sits
    beside the new as ``.<name>.old`` (removed by the next call), never half a folder.
    """
    import shutil

    path = Path(path)
    staging, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    path.parent.mkdir(parents=True, exist_ok=True)
    build(staging)
    for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
        fsync_dir(folder)
    if path.exists():
        path.rename(old)
    staging.rename(path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def json_text(obj: Any, strict: bool = False) -> str:
    """Indented, key-sorted JSON. ``strict``: refuse NaN and infinities (not JSON; strict parsers fail)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=not strict) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any, strict: bool = False) -> Path:
    return atomic_write_text(path, json_text(obj, strict))


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early (before minutes of work) if ``path`` cannot be written; create nothing."""
    return check_output_files([path])[0]


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on ``folder`` itself, for a few renames.

    The folder, not a ``.lock`` file: a lock file is either left behind in every output folder
    or removed, and removing one races (a writer that opened it before the unlink and one that
    creates a new one would both hold "the" lock). Every writer of an image pair in ``folder``
    waits for the others' renames, which take microseconds. Where folders cannot be locked
    (no ``fcntl``, some network file systems) the writers run unlocked, as before.
    """
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):  # unlockable here: the renames are still each atomic
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_image_and_sidecar(
    path: str | os.PathLike[str], write_image: Callable[[Path], Any], sidecar: dict[str, Any]
) -> tuple[Path, Path]:
    """Write an image (``write_image(tmp_path)``) and its strict-JSON sidecar as one unit.

    The sidecar also records ``image_sha256``, the hash of the image beside it. Order:

    1. both go to temporary files beside their targets, each fsync'd (the sidecar is serialised
       first of all, so a NaN in it fails before the image is even encoded);
    2. the old image, if any, is removed;
    3. the sidecar is renamed into place;
    4. the image is renamed into place, and the folder fsync'd.

    Whenever the image exists, the sidecar beside it is its own: a crash after step 2 leaves no
    image (a sidecar alone, old or new, describes nothing), never an image beside another
    image's sidecar. The price is that a crash between steps 2 and 4 loses the old image, which
    the caller was replacing anyway. Steps 2-4 hold :func:`folder_lock`, so two writers of the
    same target (threads or processes) cannot interleave them and cross their pairs.
    """
    image_path = Path(path)
    json_path = sidecar_path(image_path)
    json_text(sidecar, strict=True)  # a NaN fails here, before anything is written
    check_output_files([image_path, json_path])  # a folder in the way fails before the old image goes
    tmp_image = tmp_json = None
    try:
        tmp_image = _temp_beside(image_path)
        write_image(tmp_image)
        finish_file(tmp_image)
        record = {**sidecar, "image_sha256": file_sha256(tmp_image)}
        tmp_json = _temp_beside(json_path)
        tmp_json.write_text(json_text(record, strict=True), encoding="utf-8")
        finish_file(tmp_json)
        try:
            with folder_lock(image_path.parent):
                image_path.unlink(missing_ok=True)
                os.replace(tmp_json, json_path)
                os.replace(tmp_image, image_path)
        except OSError as e:
            raise _path_error(e, f"cannot write {image_path} and its sidecar") from None
        fsync_dir(image_path.parent)
        if json_path.parent != image_path.parent:
            fsync_dir(json_path.parent)
    finally:
        for tmp in (tmp_image, tmp_json):
            if tmp is not None and tmp.exists():
                tmp.unlink()
    return image_path, json_path


Writer = Callable[[Path], Any]


class StagedFiles:
    """Files written to temporaries beside their targets, moved into place together by :meth:`commit`.

    Everything that can fail for want of space (encoding, writing, ``fsync``) happens while
    staging, before any target changes; :meth:`commit` only renames. :meth:`discard` (also on
    leaving the ``with`` block) removes whatever temporaries remain, so a failure leaves the old
    files and no temporary.
    """

    def __init__(self, writers: Mapping[str | os.PathLike[str], Writer]) -> None:
        targets = [Path(p) for p in writers]
        if len({p.absolute() for p in targets}) != len(targets):
            raise MusarError(f"two outputs of one unit share a path: {', '.join(map(str, targets))}")
        check_output_files(targets)
        self._temps: dict[Path, Path] = {}
        try:
            for target, write in zip(targets, writers.values(), strict=True):
                self._temps[target] = tmp = _temp_beside(target)
                write(tmp)
                finish_file(tmp)
        except BaseException:
            self.discard()
            raise

    @property
    def targets(self) -> list[Path]:
        return list(self._temps)

    def commit(self) -> list[Path]:
        try:
            for target, tmp in self._temps.items():
                os.replace(tmp, target)
        except OSError as e:
            raise _path_error(e, f"cannot move {target} into place") from None
        finally:
            self.discard()
        for folder in {t.parent for t in self._temps}:
            fsync_dir(folder)
        return self.targets

    def discard(self) -> None:
        for tmp in self._temps.values():
            if tmp.exists():
                tmp.unlink()

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def write_unit(writers: Mapping[str | os.PathLike[str], Writer]) -> list[Path]:
    """Write several files as one unit: ``{path: write(tmp_path)}``; all change, or none does."""
    with StagedFiles(writers) as staged:
        return staged.commit()


def text_writer(text: str) -> Writer:
    return lambda p: p.write_text(text, encoding="utf-8")


def json_writer(obj: Any, strict: bool = False) -> Writer:
    text = json_text(obj, strict)  # serialised now: a NaN fails before anything is staged
    return text_writer(text)
