"""Batched text-only sampling of the toy base, and a tap on every layer's noise->prompt affinity.

:class:`AffinityTap` sees, in every attention layer, the q/k that attention itself uses (after
RMSNorm and RoPE) and computes S* from them with :func:`musar.models.routing.subject_affinity`, the
function dynamic routing is defined by. It serves three callers:

* the grounding probe (gate 1): the base's own S* during text-only generation, per layer and
  step, with no LoRA and no references;
* the routing probe of conditioned generation (gate 3): the same q/k MUSAR routes with, per
  layer (:class:`~musar.pipelines.routing_maps.RoutingRecorder` keeps only the layer mean);
* the grounding term of base pretraining (:mod:`musar.toy.grounding`), with gradients.

It is the core processor's ``capture`` hook (:class:`~musar.models.attention.AttentionCapture`),
so every layer computes exactly what it computes without it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from musar.models.attention import AttentionCapture, MusarAttnProcessor
from musar.models.routing import subject_affinity
from musar.pipelines.pipeline_musar import MusarPipeline

STEPS = 16  # Euler steps of every toy measurement
TEXT_LENGTH = 64  # T5 tokens of a main prompt at generation (what the toy's MUSAR config uses)


@dataclass
class AffinityTap:
    """Collects S* per (step, layer). ``spans`` (B, c, 2) are used when the forward carries none
    (text-only generation); a conditioned forward's own spans take precedence.

    ``grad``: keep the autograd graph (for a training loss); otherwise records are detached CPU
    tensors. ``enabled`` switches recording off without uninstalling the processors.
    """

    spans: torch.Tensor | None = None
    grad: bool = False
    enabled: bool = True
    records: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    batches: list[np.ndarray] = field(default_factory=list)  # routes of finished batches, see flush

    step: int = 0  # the denoising step of the next forward (set by the sampler)
    text_len: int = 0  # prompt tokens of the current forward (seen by its double blocks)

    def record(
        self, layer: int, step: int, q_noise: torch.Tensor, k_prompt: torch.Tensor, spans: torch.Tensor | None,
        candidates: torch.Tensor | None = None,
    ) -> None:
        """S* of one layer; with ``candidates`` (boxes) the conditions a token may not read are
        masked out, so the recorded argmax is the route the layer actually took."""
        spans = spans if spans is not None else self.spans
        if not self.enabled or spans is None:
            return
        aff = subject_affinity(q_noise, k_prompt, spans.to(q_noise.device))
        if candidates is not None:
            aff = aff.masked_fill(~candidates.to(aff.device), float("-inf"))
        self.records[(step, layer)] = aff if self.grad else aff.detach().cpu()

    def capture(self, layer: int, seen: AttentionCapture) -> None:
        """The hook of layer ``layer`` (see :func:`install_tap`)."""
        if seen.routing is None:  # text-only: the prompt leads the sequence (double blocks say how long)
            if seen.text_len is not None:
                self.text_len = seen.text_len
            n = self.text_len
            self.record(layer, self.step, seen.query[:, :, n:], seen.key[:, :, :n], None)
            return
        ctx = seen.routing.ctx
        if ctx.cache is None:  # a cached forward holds no prompt keys of its own layout
            lay = ctx.layout
            self.record(seen.routing.index, ctx.step, seen.query[:, :, lay.noise_slice], seen.key[:, :, lay.prompt_slice],
                        ctx.spans, ctx.candidates_on(seen.query.device))

    def clear(self) -> None:
        self.records = {}
        self.batches = []

    def flush(self) -> None:
        """Move the current records' routes to :attr:`batches` (one entry per sampled batch)."""
        if self.records:
            self.batches.append(self.routes())
        self.records = {}

    def all_routes(self) -> np.ndarray:
        """(steps, layers, B_total, n): every flushed batch, concatenated over samples."""
        return np.concatenate(self.batches, axis=2)

    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self.records})

    def steps(self) -> list[int]:
        return sorted({step for step, _ in self.records})

    def routes(self) -> np.ndarray:
        """(steps, layers, B, n) int64 routes argmax_k S*, in :meth:`steps` x :meth:`layers` order."""
        return np.stack([
            np.stack([self.records[(s, layer)].argmax(-1).numpy() for layer in self.layers()])
            for s in self.steps()
        ])


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]  # type: ignore[attr-defined]


@contextmanager
def tapped(transformer: torch.nn.Module, tap: AffinityTap) -> Iterator[AffinityTap]:
    """Install ``tap`` in every attention layer for the duration of the block."""
    install_tap(transformer, tap)
    try:
        yield tap
    finally:
        remove_tap(transformer)


def install_tap(transformer: torch.nn.Module, tap: AffinityTap) -> None:
    """Install ``tap`` for good (pretraining keeps it for every step): each layer gets its own
    core processor whose ``capture`` hook is the tap."""
    for i, block in enumerate(_blocks(transformer)):
        hook = functools.partial(tap.capture, i)
        block.attn.set_processor(MusarAttnProcessor(capture=hook).keeping_backend_of(block.attn.processor))


def remove_tap(transformer: torch.nn.Module) -> None:
    """Put plain :class:`MusarAttnProcessor` back wherever a tap is installed."""
    for block in _blocks(transformer):
        proc = block.attn.processor
        if isinstance(proc, MusarAttnProcessor) and proc.capture is not None:
            block.attn.set_processor(MusarAttnProcessor().keeping_backend_of(proc))


def sample_text_only(
    pipe: MusarPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    height: int = 64,
    width: int = 64,
    steps: int = STEPS,
    length: int = TEXT_LENGTH,
    pooled_prompts: Sequence[str] | None = None,
    batch: int = 64,
    tap: AffinityTap | None = None,
    spans: torch.Tensor | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed), the base alone (no references), in batches of ``batch``:
    :meth:`MusarPipeline.text_to_image`, i.e. diffusers' own FLUX sampler.

    Each image's starting noise comes from its own seed, so an image does not depend on the
    batch it was drawn in. ``pooled_prompts``: take the pooled vector from these prompts instead
    (the pooled-shortcut probe). With a ``tap`` installed (:func:`tapped`) and ``spans`` (N, c, 2)
    for the prompts, each batch's routes are flushed into ``tap.batches``.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")

    def next_step(_pipe: object, i: int, _t: object, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if tap is not None:  # the tap labels what it records with the step of the coming forward
            tap.step = i + 1
        return tensors

    out: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        text: dict[str, object] = {"prompt": chunk}
        if pooled_prompts is not None:
            embeds = pipe.encode_prompt(prompt=chunk, prompt_2=None, device="cpu", max_sequence_length=length)[0]
            other = list(pooled_prompts[start : start + batch])
            pooled = pipe.encode_prompt(prompt=other, prompt_2=None, device="cpu", max_sequence_length=length)[1]
            text = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if tap is not None:
            tap.records, tap.step = {}, 0
            tap.spans = None if spans is None else spans[start : start + batch]
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch]]
        out.extend(pipe.text_to_image(
            **text, height=height, width=width, num_inference_steps=steps, generator=gens,
            max_sequence_length=length, progress=False, callback_on_step_end=next_step,
        ).images)
        if tap is not None:
            tap.flush()
    return out


def pooled_norms(pipe: MusarPipeline, prompts: Sequence[str]) -> float:
    """Mean L2 norm of what the pooled vector adds to the timestep embedding (0 when it is off)."""
    with torch.no_grad():
        pooled = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device="cpu", max_sequence_length=TEXT_LENGTH)[1]
        emb = pipe.transformer.time_text_embed.text_embedder(pooled)
    return float(emb.norm(dim=-1).mean())
