"""One process at a time per output folder: an exclusive, non-blocking ``flock`` on ``<folder>/.lock``.

A training run or an evaluation that shares its folder with another one would overwrite that
run's checkpoints, LoRA, metrics or images while both report success. So every command that
writes a run folder holds this lock for as long as it writes; a second one fails at once with one
line naming the holder (pid, host, start time, command), read from the lock file itself.

Why ``flock`` and not a marker file: the kernel drops the lock when its holder exits, however it
exits (crash, ``kill -9``, power loss), so there is no stale lock to clean up and no "is that pid
still alive?" guess. Consequences that shape the code:

* the lock file is written *in place*, never by an atomic rename (the rule for every other file):
  ``flock`` locks an inode, and a renamed-in replacement would be a new, unlocked inode;
* it is never deleted: a process that opened the old inode would lock it while a third process
  locks a freshly created one, and both would believe they hold the folder;
* the lock belongs to an open file description, so a second ``flock`` from the *same* process
  through another descriptor would fail; acquiring is therefore reentrant per process (the
  trainer takes the lock the command line already holds);
* forked children (DataLoader workers) share the description and keep the lock while they live;
  ``O_CLOEXEC`` keeps exec'd programs from inheriting it.

Where ``fcntl`` does not exist (Windows) the lock is a no-op; on network file systems without
``flock`` support, locking fails with one line rather than pretending to succeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from musar.errors import MusarError
from musar.utils.safe_load import parse_json

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
_MAX_RECORD = 4096  # bytes of the holder record we read back; ours are ~200

_guard = threading.Lock()
_held: dict[str, list[Any]] = {}  # lock file (real path) -> [fd, holds, bytes it held before], this process's locks


class FolderInUse(MusarError):
    """Another process holds the folder's lock."""


def lock_path(folder: str | os.PathLike[str]) -> Path:
    return Path(folder) / LOCK_FILE


def _record() -> bytes:
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    program = "musar" if program == "__main__.py" else program  # `python -m musar.cli`
    command = " ".join([program, *sys.argv[1:]])
    return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command[:300]}) + "\n").encode()


def read_holder(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the lock file says about its last holder (None if it is missing or unreadable).

    The holder writes its record right after locking, so a reader may see it half-written; that
    reads as None, never as an error.
    """
    try:
        with open(lock_path(folder), "rb") as f:
            raw = f.read(_MAX_RECORD)
        value = parse_json(raw.decode("utf-8"), "lock file", expect=dict)
    except (OSError, UnicodeDecodeError, MusarError):
        return None
    return value


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    parts = [f"pid {holder.get('pid', '?')}"]
    if holder.get("host"):
        parts.append(f"on {holder['host']}")
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    if holder.get("command"):
        parts.append(f"running `{holder['command']}`")
    return " ".join(str(p) for p in parts)


class RunLock:
    """This process's hold on a folder's lock; :meth:`release` (or the process ending) lets go.

    Keep a reference for as long as the folder is in use: a hold that is garbage-collected is
    released, so a forgotten lock cannot outlive its user in a long-lived process (UI, tests).
    """

    def __init__(self, folder: Path, key: str | None) -> None:
        self.folder, self._key = folder, key

    @property
    def held(self) -> bool:
        return self._key is not None

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del _held[key]
                # The record only names a live holder: put back what the file held, so a run that
                # was refused (or has ended) leaves its folder byte for byte as it found it.
                if entry[2] is not None:
                    data, atime, mtime = entry[2]
                    with contextlib.suppress(OSError):
                        os.ftruncate(entry[0], 0)
                        os.pwrite(entry[0], data, 0)
                        os.utime(entry[0], ns=(atime, mtime))
                os.close(entry[0])  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # A bare try: at interpreter exit this module's globals (contextlib too) may be gone.
        try:  # noqa: SIM105
            self.release()
        except Exception:
            pass


def acquire(folder: str | os.PathLike[str], what: str = "run") -> RunLock:
    """Lock ``folder`` (created if missing) for this process, or raise :class:`FolderInUse`.

    Non-blocking: a held folder fails at once with the holder named. Reentrant within a process.
    ``what`` names the kind of command in the message ("training run", "evaluation").
    """
    folder = Path(folder).expanduser()
    if fcntl is None:  # pragma: no cover - no flock on this platform
        return RunLock(folder, None)
    path = lock_path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(path)
    except OSError as e:
        raise MusarError(f"cannot create {folder}: {e.strerror or e}") from None
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return RunLock(folder, key)
        try:
            # O_NOFOLLOW: a symlink planted as .lock must not make us truncate its target.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise MusarError(f"cannot open the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by another {what} ({describe_holder(read_holder(folder))}); "
                              "wait for it to finish or choose another folder") from None
        except OSError as e:
            os.close(fd)
            raise MusarError(f"cannot lock {path}: {e.strerror or e} (does this file system support flock?)") from None
        try:
            st = os.fstat(fd)
            before = (os.pread(fd, 1 << 16, 0), st.st_atime_ns, st.st_mtime_ns)
            os.ftruncate(fd, 0)
            os.pwrite(fd, _record(), 0)
        except OSError:
            before = None  # the lock is what excludes; the record only names the holder
        _held[key] = [fd, 1, before]
    return RunLock(folder, key)


@contextlib.contextmanager
def hold(folder: str | os.PathLike[str], what: str = "run", enabled: bool = True) -> Iterator[RunLock]:
    """``with hold(folder):`` the folder is this process's until the block ends.

    ``enabled=False`` takes nothing (the non-main ranks of a multi-process run, whose main
    process holds the lock for all of them).
    """
    lock = acquire(folder, what) if enabled else RunLock(Path(folder), None)
    try:
        yield lock
    finally:
        lock.release()
