"""A data batch as the transformer takes it: VAE latents, text embeddings, subject spans.

Encoding (VAE, both text encoders) runs frozen under ``no_grad``. Target latents are *sampled*
from the VAE posterior (with the step's generator, so resuming is exact); references use the
posterior mode, exactly as :func:`musar.pipelines.conditions.encode_references` does at inference.
Kept apart from :mod:`musar.train.objective` so the flow-matching math stays pure tensor functions,
and the encoders, tokenizers and caches live here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from musar.data import Batch
from musar.errors import MusarError
from musar.models.options import RoutingOptions
from musar.models.transformer import ConditionInputs, condition_image_ids, latent_image_ids
from musar.utils.spans import find_subject_spans, spans_tensor


def _encode_text(pipe: Any, kind: str, text: str, length: int) -> tuple[torch.Tensor, ...]:
    """A prompt's (T5 sequence, CLIP pooled) or a phrase's (T5 sequence,), on the pipe's device."""
    device = pipe.vae.device
    if kind == "prompt":
        embeds, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, device=device, max_sequence_length=length)
        return embeds, pooled
    return (pipe._get_t5_prompt_embeds(prompt=text, max_sequence_length=length, device=device),)


class TextCache:
    """Text embeddings through :func:`functools.lru_cache` of ``size`` entries (0: no caching),
    keyed (pipe, kind, text, length): the T5/CLIP encoders are frozen. A class only so each run
    gets its own cache of its own size; hit counts are ``encode.cache_info()``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.encode = functools.lru_cache(maxsize=size)(_encode_text)


@dataclass
class EncodedBatch:
    """Everything the transformer needs for one batch, minus the noise."""

    latents: torch.Tensor  # (B, n, C) packed clean target latents x_0
    latent_ids: torch.Tensor  # (n, 3)
    prompt_embeds: torch.Tensor  # (B, m, D)
    pooled: torch.Tensor  # (B, P)
    text_ids: torch.Tensor  # (m, 3)
    conditions: ConditionInputs
    spans_found: bool = True  # False: a phrase could not be located, dynamic routing is off for it

    @property
    def num_tokens(self) -> int:
        return int(self.latents.shape[1])


def batch_spans(pipe: Any, prompts: Sequence[str], phrases: Sequence[Sequence[str]], max_length: int) -> list[list[tuple[int, int]]]:
    """Token spans of every sample's phrases in its prompt (raises MusarError if one is missing)."""
    return [find_subject_spans(p, ph, pipe.tokenizer_2, max_length) for p, ph in zip(prompts, phrases, strict=True)]


@contextlib.contextmanager
def quiet_truncation() -> Iterator[None]:
    """Mute FluxPipeline's per-call truncation warnings (CLIP keeps 77 tokens by design; padded
    phrases trip a false alarm): in training they would repeat on every batch."""
    log = logging.getLogger("diffusers.pipelines.flux.pipeline_flux")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@torch.no_grad()
@quiet_truncation()
def encode_batch(
    pipe: Any,
    batch: Batch,
    *,
    max_sequence_length: int = 512,
    phrase_tokens: int = 32,
    condition_timestep: float = 0.0,
    generator: torch.Generator | None = None,
    cache: TextCache | None = None,
    dtype: torch.dtype | None = None,
) -> EncodedBatch:
    """VAE- and text-encode a :class:`~musar.data.Batch` with the pipeline's frozen encoders."""
    device = pipe.vae.device
    dtype = dtype or pipe.transformer.dtype
    cache = cache or TextCache(0)
    b, c = len(batch), batch.num_conditions

    x0 = pipe.encode_image_latents(batch.target, generator).to(dtype)
    lat_h, lat_w = batch.target.shape[-2] // pipe.vae_scale_factor, batch.target.shape[-1] // pipe.vae_scale_factor
    latent_ids = latent_image_ids(lat_h // 2, lat_w // 2, device, dtype)

    encoded = [cache.encode(pipe, "prompt", p, max_sequence_length) for p in batch.prompts]
    embeds = torch.cat([e[0] for e in encoded]).to(dtype)
    pooled = torch.cat([e[1] for e in encoded]).to(dtype)
    text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)

    cond_latents, cond_text, cond_ids = [], [], []
    for k in range(c):
        refs = pipe.encode_image_latents(batch.references[:, k])  # posterior mode, as at inference
        cond_latents.append(refs.to(dtype))
        side = batch.references.shape[-1] // (2 * pipe.vae_scale_factor)
        cond_ids.append(condition_image_ids(k, batch.references.shape[-2] // (2 * pipe.vae_scale_factor), side, device, dtype))
        rows = [cache.encode(pipe, "phrase", ph[k], phrase_tokens)[0] for ph in batch.phrases]
        cond_text.append(torch.cat(rows).to(dtype))

    spans, found = None, True
    if c >= 2:  # spans only matter for dynamic routing, which needs two or more conditions
        try:
            spans = spans_tensor(batch_spans(pipe, batch.prompts, batch.phrases, max_sequence_length), device=device)
        except MusarError:
            found = False
    conditions = ConditionInputs(cond_latents, cond_text, cond_ids, spans=spans, timestep=condition_timestep)
    if b != x0.shape[0]:
        raise RuntimeError("encoded batch size does not match the data batch")
    return EncodedBatch(x0, latent_ids, embeds, pooled, text_ids, conditions, found)


def routing_for(enc: EncodedBatch, routing: RoutingOptions) -> RoutingOptions:
    """The batch's routing: dynamic routing off when its subject spans could not be found."""
    return routing if enc.spans_found else replace(routing, dynamic=False)
