"""Condition tokens from prepared reference images: packed VAE latents and their position ids.

Computed once per call, never once per denoising step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from musar.models.transformer import condition_image_ids


@dataclass
class EncodedReference:
    latents: torch.Tensor  # (B, n', C) packed
    ids: torch.Tensor  # (n', 3)


def encode_references(
    pipe: object, images: Sequence[Image.Image], size: int, batch: int, device: torch.device, dtype: torch.dtype
) -> list[EncodedReference]:
    """VAE-encode prepared references (deterministically: the posterior mode) and pack them."""
    out = []
    tokens = size // (2 * pipe.vae_scale_factor)  # type: ignore[attr-defined]  # per side
    for k, image in enumerate(images):
        pixels = pipe.image_processor.preprocess(image, height=size, width=size)  # type: ignore[attr-defined]
        packed = pipe.encode_image_latents(pixels).to(dtype)  # type: ignore[attr-defined]
        ids = condition_image_ids(k, tokens, tokens, device, dtype)
        out.append(EncodedReference(packed.expand(batch, -1, -1), ids))
    return out
