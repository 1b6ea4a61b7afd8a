"""GGUF Q8_0 checkpoints of a transformer, in the layout diffusers' GGUF loader reads.

Published FLUX.1-dev GGUF files can be loaded as they are (``--quantize gguf:PATH``). This module
makes such files from weights at hand, for the benchmark (random full-size weights: no download)
and the tests. Q8_0 is GGML's simplest block format: per 32 consecutive weights of a row, one
float16 scale ``d = max|w| / 127`` and 32 int8 values ``round(w / d)`` (34 bytes). It is encoded
here in torch, so 12B weights take seconds on a GPU instead of minutes in gguf-py's numpy
reference (:func:`gguf.quants.quantize`, against which the tests check these bytes).

Keys stay diffusers' (``transformer_blocks.0.attn.to_q.weight``): diffusers' single-file loader
uses a checkpoint whose keys already match the model as it is, and converts BFL keys otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from musar.utils.io import atomic_path

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
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows, cols // BLOCK, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inv
    q = (scaled.sign() * (scaled.abs() + 0.5).floor()).to(torch.int8)
    packed = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)
    return packed.reshape(rows, cols // BLOCK * BLOCK_BYTES)


Tensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


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
