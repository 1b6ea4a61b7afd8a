"""A safetensors file's structure, checked without torch and without reading its tensors.

The format is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape,
byte range; optional ``__metadata__`` of strings) and one data buffer the byte ranges tile
exactly. Reading the header and comparing it with the file size finds what a crash or a bad copy
leaves behind (truncation, garbage, a foreign file) in microseconds, so the CLI checks LoRA files
and the trainer checks every checkpoint file before anything heavy is imported or loaded.
It cannot see flipped bits inside the data; checkpoints add a hash manifest for that.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

from musar.errors import MusarError
from musar.utils.safe_load import as_path, decode_utf8, open_regular, parse_json, shown

# safetensors' own limit on the header size.
MAX_HEADER_BYTES = 100_000_000
# Every dtype safetensors 0.4-0.8 writes, in bits per element (the sub-byte floats are packed).
# A name outside this table is not a safetensors file we can read, whatever else it holds.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
DTYPE_BYTES: dict[str, int] = {name: bits // 8 for name, bits in DTYPE_BITS.items() if bits % 8 == 0}
# No real tensor has more dimensions; a hostile header with a million of them costs math.prod time.
MAX_RANK = 16


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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a dimension


def _entry(name: str, raw: object) -> TensorEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"tensor {name!r} has no dtype/shape/offsets")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise ValueError(f"tensor {name!r} has no dtype/shape/offsets")
    if dtype not in DTYPE_BITS:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype[:20]!r}")
    if len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape) or not all(map(_is_int, offsets)):
        raise ValueError(f"tensor {name!r} has a malformed shape or offsets")
    begin, end = offsets
    if not 0 <= begin <= end:  # that the ranges fit the file is the tiling check's (read_header)
        raise ValueError(f"tensor {name!r} has offsets {offsets}")
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    if bits % 8 or end - begin != bits // 8:
        raise ValueError(f"tensor {name!r} ({dtype} {shape}) spans {end - begin} bytes")
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_header(path: str | os.PathLike[str], what: str = "file") -> SafetensorsHeader:
    """Header of a complete, well-formed safetensors file, or a one-line :class:`MusarError`.

    ``what`` names the file in messages ("LoRA file", "checkpoint file"). Every entry is checked
    against the file size before anything is read past the header, so a hostile header cannot
    make a later loader seek, allocate or map more than the file holds.
    """
    with open_regular(path, what) as f:
        path = as_path(path, what)
        try:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, file_size - 8):
                raise ValueError(f"header length {length} does not fit a {file_size}-byte file")
            text = f.read(length)
            if len(text) != length:
                raise ValueError("the file shrank while it was read")
        except PermissionError:
            raise MusarError(f"cannot read {what} (permission denied): {shown(path)}") from None
        except OSError as e:
            raise MusarError(f"cannot read {what} {shown(path)}: {e.strerror or e}") from None
        except ValueError as e:
            raise MusarError(f"{shown(path)} is not a safetensors file ({e})") from None
    data_size = file_size - 8 - length
    try:
        raw = parse_json(decode_utf8(text, "header"), "header", expect=dict)
        metadata = raw.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a mapping of strings")
        tensors = {name: _entry(name, entry) for name, entry in raw.items()}
    except (ValueError, MusarError) as e:  # MusarError: parse_json's line, which names "header"
        raise MusarError(f"{shown(path)} is not a safetensors file ({e})") from None
    covered = sorted((t.begin, t.end) for t in tensors.values())
    position = 0
    for begin, end in covered:  # the byte ranges must tile the buffer: no gap, no overlap
        if begin != position:
            raise MusarError(f"{shown(path)} is damaged: tensor data does not tile the buffer at byte {position}")
        position = end
    if position != data_size:
        state = "truncated" if position > data_size else "damaged"
        raise MusarError(f"{shown(path)} is {state}: its header declares {position} data bytes, the file holds {data_size}")
    return SafetensorsHeader(dict(metadata), tensors)
