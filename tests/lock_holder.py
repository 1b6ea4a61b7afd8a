"""A run lock held by another process, for the tests of what a second run on a folder does."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path, what: str = "run") -> Iterator[subprocess.Popen[str]]:
    """``folder``'s lock held by a child process for the block; SIGKILLed after (no cleanup runs)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom musar.utils import run_lock\n"
         f"lock = run_lock.acquire({str(folder)!r}, {what!r})\nprint('held', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
