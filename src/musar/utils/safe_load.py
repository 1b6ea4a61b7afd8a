"""Reading files a user (or an attacker) hands us: one defensive parser for text, JSON and YAML.

Every JSON or YAML file this package reads that it did not just write itself in the same process
(configs, checkpoints' JSON, eval case files, model folders' ``model_index.json`` and configs,
tracker logs) goes through here, so a whole class of hostile files fails the same way: one
:class:`~musar.errors.MusarError` line naming the file, before anything else happens.

The mechanism, not a case list:

* only regular files are opened (a FIFO, a device or a socket would block or never end);
* the size is bounded before reading (``max_bytes``);
* bytes must be UTF-8 (a clear line instead of a ``UnicodeDecodeError`` traceback);
* the parsed value's nesting depth is bounded (Python's parsers recurse; a 100 000-deep ``[[[``
  is a ``RecursionError`` deep inside them, and a shallow file is never the problem), and so is
  its node count (YAML aliases can expand a kilobyte into gigabytes: the "billion laughs");
* the top-level type is checked when the caller names one (``expect=dict``).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from musar.errors import MusarError

MAX_TEXT_BYTES = 64 * 1024 * 1024  # no JSON/YAML file of ours comes near; a bound, not a budget
MAX_DEPTH = 64  # our deepest real file (a train config) nests 4 levels
MAX_NODES = 1_000_000  # values in one parsed document, aliases expanded


def check_regular_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` exists and is a regular file (following symlinks): never a FIFO, device or socket."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MusarError(f"{what} not found: {path}") from None
    except OSError as e:
        raise MusarError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise MusarError(f"{what} is a folder, not a file: {path}")
    if not stat.S_ISREG(mode):
        raise MusarError(f"{what} is not a regular file (a pipe, device or socket): {path}")
    return path


def read_text(path: str | os.PathLike[str], what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``, or one line saying why not."""
    path = check_regular_file(path, what)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise MusarError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise MusarError(f"{what} {path} is larger than {max_bytes:,} bytes; is it the right file?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MusarError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def check_structure(value: Any, where: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Any:
    """Raise if ``value`` nests deeper than ``max_depth`` or holds more than ``max_nodes`` values.

    Iterative, so checking a hostile value cannot itself overflow the stack; a YAML alias visited
    twice counts twice, which is what bounds an alias bomb.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise MusarError(f"{where} holds more than {max_nodes:,} values; refusing to read it")
        if isinstance(node, dict | list | tuple):
            if depth > max_depth:
                raise MusarError(f"{where} nests deeper than {max_depth} levels; refusing to read it")
            children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return value


def _expect(value: Any, expect: type | tuple[type, ...] | None, where: str) -> Any:
    if expect is not None and not isinstance(value, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        want = {"dict": "a mapping", "list": "a list"}.get(names, names)
        raise MusarError(f"{where} must hold {want} at the top level, got {type(value).__name__}")
    return value


def parse_json(text: str, where: str, expect: type | tuple[type, ...] | None = None) -> Any:
    """Parse JSON text that came from ``where`` (a file name, or 'the header of X')."""
    if text.count("[") + text.count("{") > MAX_NODES:
        raise MusarError(f"{where} holds more than {MAX_NODES:,} values; refusing to read it")
    try:
        value = json.loads(text)
    except RecursionError:
        raise MusarError(f"{where} nests deeper than {MAX_DEPTH} levels; refusing to read it") from None
    except ValueError as e:  # JSONDecodeError, and the int-digit limit of very long numbers
        raise MusarError(f"{where} is not valid JSON: {str(e).splitlines()[0]}") from None
    return _expect(check_structure(value, where), expect, where)


def read_json(path: str | os.PathLike[str], what: str = "JSON file",
              expect: type | tuple[type, ...] | None = None, max_bytes: int = MAX_TEXT_BYTES) -> Any:
    """A JSON file, defensively: regular file, bounded size, UTF-8, bounded depth, type."""
    path = Path(path).expanduser()
    return parse_json(read_text(path, what, max_bytes), f"{what} {path}", expect)


def parse_yaml(text: str, where: str, expect: type | tuple[type, ...] | None = None) -> Any:
    """Parse YAML text with ``yaml.safe_load`` (no object construction), bounded like JSON."""
    import yaml

    if "\x00" in text:
        raise MusarError(f"{where} contains a NUL byte; it is not a text file")
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise MusarError(f"{where} nests deeper than {MAX_DEPTH} levels; refusing to read it") from None
    except yaml.YAMLError as e:
        raise MusarError(f"{where} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    return _expect(check_structure(value, where), expect, where)


def read_yaml(path: str | os.PathLike[str], what: str = "YAML file",
              expect: type | tuple[type, ...] | None = None, max_bytes: int = MAX_TEXT_BYTES) -> Any:
    """A YAML file, defensively (see :func:`read_json`)."""
    path = Path(path).expanduser()
    return parse_yaml(read_text(path, what, max_bytes), f"{what} {path}", expect)
