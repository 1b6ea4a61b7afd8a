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

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from musar.errors import MusarError

MAX_TEXT_BYTES = 64 * 1024 * 1024  # no JSON/YAML file of ours comes near; a bound, not a budget
MAX_DEPTH = 64  # our deepest real file (a train config) nests 4 levels
MAX_NODES = 1_000_000  # values in one parsed document, aliases expanded
# Linux's NAME_MAX and PATH_MAX (macOS: 255 and 1024, the OS refuses there first). Checked here so
# a too-long name is our one line, not ENAMETOOLONG from whichever call happened to stat it first.
NAME_MAX = 255
PATH_MAX = 4096


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` for a one-line message: control characters (a newline in a file name would split
    the line) and undecodable bytes are escaped, printable text is kept as typed."""
    text = os.fspath(path)
    text = text if isinstance(text, str) else os.fsdecode(text)
    if text.isprintable():
        return text
    return repr(text)[1:-1]


def as_path(path: str | os.PathLike[str], what: str = "path") -> Path:
    """``path`` with ``~`` expanded, or one line saying why the OS could never open it.

    pathlib raises ``RuntimeError`` for ``~nosuchuser``, ``ValueError`` for a NUL byte and
    ``OSError`` (ENAMETOOLONG) for a long name, each from a different call; this is the one
    place all of them become a :class:`MusarError` naming ``what``.
    """
    try:
        raw = os.fspath(path)
    except TypeError:
        raise MusarError(f"{what} must be a path, got {type(path).__name__}") from None
    text = raw if isinstance(raw, str) else os.fsdecode(raw)
    if "\x00" in text:
        raise MusarError(f"{what} path contains a NUL byte: {shown(text)}")
    try:
        expanded = Path(text).expanduser()
    except RuntimeError:  # "~user" with no such user (or no home directory at all)
        raise MusarError(f"{what} path starts with an unknown home directory: {shown(text)}") from None
    try:
        encoded = os.fsencode(expanded)
    except UnicodeError:  # lone surrogates that no file system name can hold
        raise MusarError(f"{what} path is not encodable as a file name: {shown(text)}") from None
    if len(encoded) >= PATH_MAX:
        raise MusarError(f"{what} path is longer than {PATH_MAX - 1} bytes: {shown(text)[:80]}...")
    long = next((part for part in encoded.split(b"/") if len(part) > NAME_MAX), None)
    if long is not None:
        raise MusarError(
            f"{what} path has a part longer than {NAME_MAX} bytes ({len(long)}): {shown(os.fsdecode(long))[:60]}..."
        )
    return expanded


@contextlib.contextmanager
def path_errors(what: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Whatever the OS says while looking at ``path`` (EACCES on a parent, ELOOP, a path that
    changed under us) becomes one :class:`MusarError` line naming ``what``."""
    try:
        yield
    except MusarError:
        raise
    except PermissionError:
        raise MusarError(f"cannot use {what} (permission denied): {shown(path)}") from None
    except OSError as e:
        raise MusarError(f"cannot use {what} {shown(path)}: {e.strerror or e}") from None
    except (ValueError, RuntimeError) as e:
        raise MusarError(f"bad {what} path {shown(path)}: {e}") from None


def check_regular_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` exists and is a regular file (following symlinks): never a FIFO, device or socket."""
    path = as_path(path, what)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MusarError(f"{what} not found: {shown(path)}") from None
    except OSError as e:
        raise MusarError(f"cannot read {what} {shown(path)}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise MusarError(f"{what} is a folder, not a file: {shown(path)}")
    if not stat.S_ISREG(mode):
        raise MusarError(f"{what} is not a regular file (a pipe, device or socket): {shown(path)}")
    return path


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str], what: str = "file") -> Iterator[IO[bytes]]:
    """``path`` opened for binary reading, checked to be a regular file *on the open descriptor*
    as well: a path swapped for a FIFO between the check and the open still cannot block us
    (``O_NONBLOCK`` makes that open return at once, and fstat then refuses it)."""
    path = check_regular_file(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise MusarError(f"cannot read {what} {shown(path)}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MusarError(f"{what} is not a regular file (a pipe, device or socket): {shown(path)}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_bytes(path: str | os.PathLike[str], what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, or one line saying why not."""
    with open_regular(path, what) as f:
        try:
            raw = f.read(max_bytes + 1)
        except OSError as e:
            raise MusarError(f"cannot read {what} {shown(path)}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise MusarError(f"{what} {shown(path)} is larger than {max_bytes:,} bytes; is it the right file?")
    return raw


def decode_utf8(raw: bytes, where: str) -> str:
    """``raw`` as UTF-8 text, or one line naming ``where`` and the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MusarError(f"{where} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_text(path: str | os.PathLike[str], what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``, or one line saying why not."""
    return decode_utf8(read_bytes(path, what, max_bytes), f"{what} {shown(as_path(path, what))}")


def read_lines(path: str | os.PathLike[str], what: str = "file", expect: type | tuple[type, ...] | None = None,
               max_bytes: int = MAX_TEXT_BYTES) -> list[Any]:
    """A JSON-lines file: one defensively parsed value per non-blank line (see :func:`parse_json`)."""
    shown_path = shown(as_path(path, what))
    text = read_text(path, what, max_bytes)
    return [parse_json(line, f"{what} {shown_path} line {n}", expect)
            for n, line in enumerate(text.splitlines(), 1) if line.strip()]


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


def _parse(text: str, where: str, expect: type | tuple[type, ...] | None, kind: str,
           load: Callable[[str], Any], errors: tuple[type[BaseException], ...], reason: Callable[[BaseException], str]) -> Any:
    """The one bounded parse: a recursion error is "too deep", a parser error one line, then the
    structure and top-level type checked."""
    try:
        value = load(text)
    except RecursionError:
        raise MusarError(f"{where} nests deeper than {MAX_DEPTH} levels; refusing to read it") from None
    except errors as e:
        raise MusarError(f"{where} is not valid {kind}: {reason(e)}") from None
    return _expect(check_structure(value, where), expect, where)


def parse_json(text: str, where: str, expect: type | tuple[type, ...] | None = None) -> Any:
    """Parse JSON text that came from ``where`` (a file name, or 'the header of X')."""
    if text.count("[") + text.count("{") > MAX_NODES:
        raise MusarError(f"{where} holds more than {MAX_NODES:,} values; refusing to read it")
    # ValueError: JSONDecodeError, and the int-digit limit of very long numbers
    return _parse(text, where, expect, "JSON", json.loads, (ValueError,), lambda e: str(e).splitlines()[0])


def read_json(path: str | os.PathLike[str], what: str = "JSON file",
              expect: type | tuple[type, ...] | None = None, max_bytes: int = MAX_TEXT_BYTES) -> Any:
    """A JSON file, defensively: regular file, bounded size, UTF-8, bounded depth, type."""
    path = as_path(path, what)
    return parse_json(read_text(path, what, max_bytes), f"{what} {shown(path)}", expect)


def parse_yaml(text: str, where: str, expect: type | tuple[type, ...] | None = None) -> Any:
    """Parse YAML text with ``yaml.safe_load`` (no object construction), bounded like JSON."""
    import yaml

    if "\x00" in text:
        raise MusarError(f"{where} contains a NUL byte; it is not a text file")
    return _parse(text, where, expect, "YAML", yaml.safe_load, (yaml.YAMLError,), lambda e: " ".join(str(e).split())[:200])


def read_yaml(path: str | os.PathLike[str], what: str = "YAML file",
              expect: type | tuple[type, ...] | None = None, max_bytes: int = MAX_TEXT_BYTES) -> Any:
    """A YAML file, defensively (see :func:`read_json`)."""
    path = as_path(path, what)
    return parse_yaml(read_text(path, what, max_bytes), f"{what} {shown(path)}", expect)
