"""User-facing errors.

Anything the user can fix (a bad path, a phrase missing from the prompt, a LoRA file for another
model) raises :class:`MusarError` with one line naming the problem. The CLI prints that line and
exits with code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys


class MusarError(ValueError):
    """A problem with the user's input, reported as one readable line."""


# errno values that mean "the path the user gave is wrong" (exit 2) rather than "the machine
# failed while running" (exit 1: disk full, I/O error, ...).
_INPUT_ERRNOS = frozenset({2, 13, 17, 20, 21, 36, 40, 1})  # ENOENT EACCES EEXIST ENOTDIR EISDIR ENAMETOOLONG ELOOP EPERM


def _decode_errors() -> tuple[type[BaseException], ...]:
    """Errors that a hostile or damaged file raises in the libraries that parse it (a library
    that was never imported cannot have raised, so none is imported here)."""
    import json

    found: list[type[BaseException]] = [UnicodeError, json.JSONDecodeError, RecursionError]
    for module, name in (("PIL", "UnidentifiedImageError"), ("PIL.Image", "DecompressionBombError"),
                         ("yaml", "YAMLError"), ("safetensors", "SafetensorError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def describe_failure(exc: BaseException) -> tuple[int, str] | None:
    """The one error boundary of every command: ``(exit code, one line)`` for a failure the user
    can act on, or None for a bug, which keeps its traceback.

    Exit 2: bad input (:class:`MusarError`, a path that is missing, unreadable or not a file, a
    file that does not parse). Exit 1: the run failed on this machine (disk full, out of memory,
    an I/O error). The CLI prints the line; the UI and the Python API show the same text.
    """
    if isinstance(exc, MusarError):
        return 2, str(exc)
    if isinstance(exc, _decode_errors()):  # before OSError: Pillow's decode errors subclass it
        return 2, f"cannot read the input: {type(exc).__name__}: {_first_line(exc)}"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or str(exc) or type(exc).__name__
        if exc.errno == 28:
            return 1, f"{where}no space left on device; free some space and run again (earlier outputs are intact)"
        return (2 if exc.errno in _INPUT_ERRNOS else 1), f"{where}{reason}"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return 1, f"out of memory ({_first_line(exc)}); use a smaller size, batch or model"
    return None
