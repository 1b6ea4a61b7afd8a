"""A safetensors file's structure, checked without torch and without reading its tensors.

The format is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape,
byte range; optional ``__metadata__`` of strings) and one data buffer the byte ranges tile
exactly. Reading the header and comparing it with the file size finds what a crash or a bad copy
leaves behind (truncation, garbage, a foreign file) in microseconds, so the CLI checks LoRA files
and the trainer checks every checkpoint file before anything heavy is imported or loaded.
It cannot see flipped bits inside the data; checkpoints add a hash manifest for that.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from musar.errors import MusarError

# safetensors' own limit on the header size.
MAX_HEADER_BYTES = 100_000_000
# Bytes per element; dtypes missing here (packed sub-byte formats, future ones) skip the size check.
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def _entry(name: str, raw: object) -> TensorEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"tensor {name!r} has no dtype/shape/offsets")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise ValueError(f"tensor {name!r} has no dtype/shape/offsets")
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in offsets):
        raise ValueError(f"tensor {name!r} has a malformed shape or offsets")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ValueError(f"tensor {name!r} has offsets {offsets}")
    size = DTYPE_BYTES.get(dtype)
    if size is not None and end - begin != size * math.prod(shape):
        raise ValueError(f"tensor {name!r} ({dtype} {shape}) spans {end - begin} bytes")
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_header(path: str | os.PathLike[str], what: str = "file") -> SafetensorsHeader:
    """Header of a complete, well-formed safetensors file, or a one-line :class:`MusarError`.

    ``what`` names the file in messages ("LoRA file", "checkpoint file").
    """
    path = Path(path)
    if not path.is_file():
        raise MusarError(f"{what} not found: {path}" if not path.exists() else f"{what} is not a regular file: {path}")
    try:
        with path.open("rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, file_size - 8):
                raise ValueError(f"header length {length} does not fit a {file_size}-byte file")
            text = f.read(length)
        raw = json.loads(text.decode("utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("header is not a JSON object")
    except PermissionError:
        raise MusarError(f"cannot read {what} (permission denied): {path}") from None
    except OSError as e:
        raise MusarError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MusarError(f"{path} is not a safetensors file ({e})") from None

    metadata = raw.pop("__metadata__", None) or {}
    try:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a mapping of strings")
        tensors = {name: _entry(name, entry) for name, entry in raw.items()}
    except ValueError as e:
        raise MusarError(f"{path} is not a safetensors file ({e})") from None
    data_size = file_size - 8 - length
    covered = sorted((t.begin, t.end) for t in tensors.values())
    position = 0
    for begin, end in covered:  # the byte ranges must tile the buffer: no gap, no overlap
        if begin != position:
            raise MusarError(f"{path} is damaged: tensor data does not tile the buffer at byte {position}")
        position = end
    if position != data_size:
        state = "truncated" if position > data_size else "damaged"
        raise MusarError(f"{path} is {state}: its header declares {position} data bytes, the file holds {data_size}")
    return SafetensorsHeader(dict(metadata), tensors)
