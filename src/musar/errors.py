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


_CACHE_CURE = ("download it where the hub is reachable (`huggingface-cli download {repo}`, after `huggingface-cli "
               "login` and accepting its licence if it is gated) or give a local model folder")


def hub_failure(exc: BaseException, repo: str | None = None) -> str | None:
    """One line for a model the hub cannot give us: gated, unknown, or not cached while offline.

    huggingface_hub raises these from any ``from_pretrained``; diffusers and transformers rewrap
    the uncached case as an ``OSError`` ("does not appear to have a file named ...") that never
    says the cure, so both forms are read here, in one place, for every command.
    """
    hub = sys.modules.get("huggingface_hub.errors")
    repo = repo or getattr(exc, "repo_id", None) or "the model"
    if hub is not None:
        if isinstance(exc, getattr(hub, "GatedRepoError", ())):
            return (f"{repo} is gated: log in with `huggingface-cli login` and accept its licence on its hub "
                    "page, then run again (or give a local model folder)")
        if isinstance(exc, getattr(hub, "RepositoryNotFoundError", ())):
            return f"{repo} is not a model on the hub (or it is private): check the id, or give a local model folder"
        offline = tuple(getattr(hub, n) for n in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") if hasattr(hub, n))
        if offline and isinstance(exc, offline):
            return f"{repo} is not in the local Hugging Face cache and the hub is unreachable or offline; " + \
                _CACHE_CURE.format(repo=repo if repo != "the model" else "<model id>")
    text = str(exc)
    if isinstance(exc, OSError) and "does not appear to have a file named" in text:
        before = text.split(" does not appear", 1)[0].split()
        name = before[-1] if before else "<model id>"
        return (f"{name} is not a complete model in the local cache or folder (the hub may be unreachable); "
                + _CACHE_CURE.format(repo=name))
    return None


def describe_failure(exc: BaseException) -> tuple[int, str] | None:
    """The one error boundary of every command: ``(exit code, one line)`` for a failure the user
    can act on, or None for a bug, which keeps its traceback.

    Exit 2: bad input (:class:`MusarError`, a path that is missing, unreadable or not a file, a
    file that does not parse). Exit 1: the run failed on this machine (disk full, out of memory,
    an I/O error). The CLI prints the line; the UI and the Python API show the same text.
    """
    if isinstance(exc, MusarError):
        return 2, str(exc)
    hub = hub_failure(exc)
    if hub is not None:  # before OSError: the hub's errors subclass it
        return 2, hub
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
