"""GGUF Q8_0 checkpoints of a transformer, in the layout diffusers' GGUF loader reads.

Published FLUX.1-dev GGUF files can be loaded as they are (``--quantize gguf:PATH``). This module
makes such files from weights at hand, for the benchmark (random full-size weights: no download)
and the tests. Q8_0 is GGML's simplest block format: per 32 consecutive weights of a row, one
float16 scale ``d = max|w| / 127`` and 32 int8 values ``round(w / d)`` (34 bytes). It is encoded
here in torch, so 12B weights take seconds on a GPU instead of minutes in gguf-py's numpy
reference (:func:`gguf.quants.quantize`, against which the tests check these bytes).

Keys stay diffusers' (``transformer_blocks.0.attn.to_q.weight``): diffusers' single-file loader
uses a checkpoint whose keys already match the model as it is, and converts BFL keys otherwise.

Reading one is judged first (:func:`read_gguf_header`, :func:`check_gguf_fits`): a bounded reader
of the header and tensor table, no tensor data, no allocation sized by the file. Torch is
imported only by the functions that make files.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from musar.errors import MusarError
from musar.utils.io import atomic_path
from musar.utils.safe_load import open_regular, shown

if TYPE_CHECKING:
    import torch

BLOCK = 32  # weights per Q8_0 block
BLOCK_BYTES = 2 + BLOCK  # float16 scale + 32 int8


def quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Linear weights whose rows split into whole blocks; the rest (biases, norms, narrow
    embedders) stays float, as GGUF converters keep it."""
    return name.endswith(".weight") and tensor.dim() == 2 and tensor.shape[1] % BLOCK == 0


def q8_0_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The Q8_0 encoding of a 2-D ``weight``: uint8 of shape (rows, cols / 32 * 34), on its device.

    Matches gguf-py: the scale is computed in float32, rounded to float16 only for storage, and
    values are rounded half away from zero.
    """
    import torch

    rows, cols = weight.shape
    blocks = weight.float().reshape(rows, cols // BLOCK, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inv
    q = (scaled.sign() * (scaled.abs() + 0.5).floor()).to(torch.int8)
    packed = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)
    return packed.reshape(rows, cols // BLOCK * BLOCK_BYTES)


Tensors = Mapping[str, "torch.Tensor"] | Iterable[tuple[str, "torch.Tensor"]]


def q8_0_state_dict(tensors: Tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) with every quantizable weight as diffusers' ``GGUFParameter`` (Q8_0).
    ``tensors`` may be a state dict or a lazy stream of pairs (shards read one tensor at a time)."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    for name, tensor in tensors.items() if isinstance(tensors, Mapping) else tensors:
        if quantizable(name, tensor):
            yield name, GGUFParameter(q8_0_bytes(tensor), quant_type=gguf.GGMLQuantizationType.Q8_0)
        else:
            yield name, tensor


def write_gguf(tensors: Tensors, path: str | os.PathLike[str], arch: str = "flux") -> Path:
    """Write ``tensors`` as a GGUF file (Q8_0 linears, float32 elsewhere), atomically."""
    import gguf

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for name, tensor in q8_0_state_dict(tensors):
            qtype = getattr(tensor, "quant_type", None)
            if qtype is None:
                writer.add_tensor(name, tensor.detach().float().cpu().numpy())
            else:
                writer.add_tensor(name, tensor.as_tensor().cpu().numpy(), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


# -- reading: the header and tensor table, bounded --------------------------------------------------

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what gguf-py's reader (and so diffusers' GGUF loader) reads
MAX_TENSORS = 65_536  # FLUX.1's transformer has ~780; a count above this is a damaged or hostile header
MAX_KV = 65_536
MAX_STRING = 1 << 20  # one key or string value; real ones are names and short texts
MAX_ARRAY = 1 << 24  # items of one metadata array; an LLM's vocabulary has ~256k
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# GGML type id -> (elements per block, bytes per block) where gguf is not installed; it has them all.
_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 10: (256, 84),
    11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292), 30: (1, 2),
}
# GGUF value type id -> struct format of a scalar (8: string, 9: array are read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class GGUFTensor:
    shape: tuple[int, ...]  # logical, rows first (GGUF stores ne[0] = columns first)
    type_id: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    tensors: dict[str, GGUFTensor]
    data_bytes: int  # what the tensors take, from the data section's start to the last tensor's end
    file_bytes: int


def _type_sizes() -> dict[int, tuple[int, int]]:
    try:
        import gguf
    except ImportError:
        return _TYPE_SIZES
    return {int(k): (int(b), int(t)) for k, (b, t) in gguf.GGML_QUANT_SIZES.items()}


class _Reader:
    """Sequential little-endian reads that never ask for more than the file still holds."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self.f, self.size, self.pos = f, size, 0

    def _room(self, n: int) -> None:
        if n < 0 or n > self.size - self.pos:
            raise ValueError(f"it declares {n:,} more bytes at byte {self.pos:,}, past the end of the file")

    def take(self, n: int) -> bytes:
        self._room(n)
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError("the file shrank while it was read")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        """Move past ``n`` bytes without reading them (metadata arrays can be large)."""
        self._room(n)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > MAX_STRING:
            raise ValueError(f"a string of {n:,} bytes at byte {self.pos:,}")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind != 9:
            raise ValueError(f"unknown value type {kind} at byte {self.pos:,}")
        item, count = self.scalar("<I"), self.scalar("<Q")
        if count > MAX_ARRAY:
            raise ValueError(f"an array of {count:,} items at byte {self.pos:,}, more than {MAX_ARRAY:,}")
        if item in _SCALARS:  # fixed-size items: skipped in one seek
            self.skip(count * struct.calcsize(_SCALARS[item]))
        elif item == 8:  # strings (a tokenizer's vocabulary): each length checked, the text skipped
            for _ in range(count):
                self.skip(self.scalar("<Q"))
        else:  # arrays of arrays do not occur in GGUF files; refusing them bounds the work
            raise ValueError(f"an array of value type {item} at byte {self.pos:,}")
        return None


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """The header and tensor table of a complete GGUF file, or one MusarError line naming the file:
    a regular file, the magic, a version gguf-py reads, bounded counts, every tensor of a known type
    and shape, and every tensor's bytes inside the file (truncation shows). No tensor data is read."""
    with open_regular(path, "GGUF file") as f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, size)
        try:
            if size < 4 or r.take(4) != GGUF_MAGIC:
                raise MusarError(f"{shown(path)} is not a GGUF file (it does not start with the GGUF magic bytes)")
            version = r.scalar("<I")
            if version not in VERSIONS:
                raise MusarError(f"{shown(path)} is GGUF version {version}; musar reads versions "
                                 f"{', '.join(map(str, VERSIONS))}")
            n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
            for count, cap, what in ((n_tensors, MAX_TENSORS, "tensors"), (n_kv, MAX_KV, "metadata keys")):
                if count > cap:
                    raise ValueError(f"it declares {count:,} {what}, more than {cap:,}")
            alignment = DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key, kind = r.string(), r.scalar("<I")
                value = r.value(kind)
                if key == "general.alignment":
                    if kind != 4 or not value or value & (value - 1):
                        raise ValueError(f"general.alignment is {value!r}, not a power of two")
                    alignment = value
            infos = [_tensor_info(r) for _ in range(n_tensors)]
        except MusarError:
            raise
        except OSError as e:
            raise MusarError(f"cannot read GGUF file {shown(path)}: {e.strerror or e}") from None
        except (ValueError, struct.error) as e:
            raise MusarError(f"{shown(path)} is a damaged GGUF file: {e}") from None
    return _layout(path, version, infos, r.pos, alignment, size)


def _tensor_info(r: _Reader) -> tuple[str, tuple[int, ...], int, int]:
    name = r.string()
    n_dims = r.scalar("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise ValueError(f"tensor {name[:80]!r} has {n_dims} dimensions")
    dims = tuple(r.scalar("<Q") for _ in range(n_dims))
    return name, dims, r.scalar("<I"), r.scalar("<Q")


def _layout(path: str | os.PathLike[str], version: int, infos: list[tuple[str, tuple[int, ...], int, int]],
            end: int, alignment: int, size: int) -> GGUFHeader:
    sizes = _type_sizes()
    start = -(-end // alignment) * alignment  # the data section starts at the next aligned byte
    tensors: dict[str, GGUFTensor] = {}
    last = 0
    for name, dims, type_id, offset in infos:
        if type_id not in sizes:
            raise MusarError(f"{shown(path)}: tensor {name[:80]!r} has unknown GGML type {type_id}")
        block, block_bytes = sizes[type_id]
        elements = 1
        for d in dims:
            elements *= d
        if dims[0] % block or offset % alignment:
            raise MusarError(f"{shown(path)} is a damaged GGUF file: tensor {name[:80]!r} ({list(dims)}, type "
                             f"{type_id}) is misaligned")
        nbytes = elements // block * block_bytes
        last = max(last, offset + nbytes)
        tensors[name] = GGUFTensor(tuple(reversed(dims)), type_id, nbytes)
    if start + last > size:
        raise MusarError(f"{shown(path)} is truncated: its header declares {start + last:,} bytes, the file holds {size:,}")
    return GGUFHeader(version, tensors, last, size)


_GGUF_BLOCK = re.compile(r"^(transformer_blocks|double_blocks|single_transformer_blocks|single_blocks)\.(\d+)\.")
_DOUBLE = {"transformer_blocks", "double_blocks"}  # diffusers' and BFL's names


def check_gguf_fits(header: GGUFHeader, transformer_config: Mapping[str, Any], path: str | os.PathLike[str],
                    model: str) -> None:
    """Refuse a GGUF transformer of another width or another number of blocks than the model's
    config (``model`` says where it came from), from the tensor table alone. Keys may be
    diffusers' or BFL's (``img_in``, ``double_blocks``), as published FLUX GGUFs use."""
    from musar.lora.fit import transformer_width

    prefix = f"GGUF file {shown(path)} does not match the model ({model})"
    embed = header.tensors.get("x_embedder.weight") or header.tensors.get("img_in.weight")
    width = transformer_width(transformer_config)
    if embed is not None and len(embed.shape) == 2 and embed.shape[0] != width:
        raise MusarError(f"{prefix}: it holds a transformer {embed.shape[0]} wide, the model is {width} wide "
                         "(num_attention_heads x attention_head_dim)")
    blocks: dict[bool, set[int]] = {True: set(), False: set()}
    for name in header.tensors:
        m = _GGUF_BLOCK.match(name)
        if m:
            blocks[m[1] in _DOUBLE].add(int(m[2]))
    for double, key, default in ((True, "num_layers", 19), (False, "num_single_layers", 38)):
        want = transformer_config.get(key, default)
        have = max(blocks[double]) + 1 if blocks[double] else 0
        if have and have != want:
            kind = "double" if double else "single"
            raise MusarError(f"{prefix}: it has {have} {kind} blocks, the model has {want} ({key})")
