"""Routed joint attention: a diffusers attention processor plus interchangeable backends.

:class:`MusarAttnProcessor` plugs into diffusers' ``FluxAttention`` seam (``set_processor``).
It computes q/k/v with the module's own projections, RMSNorms and diffusers' RoPE, then hands
them to :class:`LayerRouting`, which

1. derives each NOISE query's route from the *same* q/k (dynamic routing, DESIGN sec. 4), as
   one fused attention call (:func:`~musar.models.routing.subject_affinity_fused`), restricted
   to the token's given route candidates if any (layout boxes, DESIGN sec. 4a; a token without
   candidates gets the "no condition" route, which every backend below honours), and
2. runs the attention under the routing rules with one of the backends:

* ``reference`` — a dense boolean (B, H|1, L, L) mask into SDPA. Obviously correct, slow.
* ``fast`` — no L x L tensor at all: queries are grouped by what they may see (PROMPT, each
  condition, and NOISE queries bucketed by route), and each group runs one *unmasked* SDPA over
  exactly the keys it may see. Work is proportional to the unmasked blocks.
* ``flex`` — one FlexAttention call with a block mask built from the layout and routes
  (:mod:`musar.models.flex`).
* ``auto`` — flex on CUDA, fast elsewhere (:func:`~musar.models.routing.resolve_backend`).

With a condition cache (:mod:`musar.models.cache`) the same code serves the cached forward: its q
holds only [PROMPT, NOISE] rows and its k/v get the cached condition keys appended; a
:class:`~musar.models.routing.SegmentMap` per tensor tells every backend where each group sits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from musar.models.layout import TokenLayout
from musar.models.routing import (
    RoutingOptions,
    SegmentMap,
    routed_mask,
    routes_from_affinity,
    span_values,
    subject_affinity_fused,
)

if TYPE_CHECKING:
    from musar.models.cache import ConditionCache


@dataclass
class RouteRecord:
    """What dynamic routing decided in one layer at one step (for Fig.-5 style maps).

    Both tensors stay on the attention's device (detached), so capturing costs no host sync per
    layer; a consumer moves what it keeps. ``affinity`` is S* before any given candidates were
    applied (what the model itself would pick); ``routes`` are the routes the layer used.
    """

    layer: int
    step: int
    affinity: torch.Tensor  # (B, n, c) head-mean, or (B, H, n, c) per head; float32
    routes: torch.Tensor  # (B, n) or (B, H, n); int64, c = no condition (see routing.no_condition)


@dataclass
class RoutingContext:
    """Everything one transformer forward needs to route attention; shared by all its layers.

    ``cache`` with ``cache_write=False``: q/k/v hold [PROMPT, NOISE] rows only and the cached
    condition K/V are appended to k/v (``layout`` is the full layout with conditions). With
    ``cache_write=True``: q/k/v hold the condition rows of a condition-only ``layout`` and
    every layer's k/v are stored into the cache.

    ``candidates`` (B, n, c) bool: given routes (DESIGN sec. 4a). Where dynamic routing acts,
    each NOISE token is routed by S* among its candidates only, and to no condition when it has
    none; where it does not act (off, before ``start_layer`` / ``start_step``) they do nothing.
    """

    layout: TokenLayout
    options: RoutingOptions = field(default_factory=RoutingOptions)
    spans: torch.Tensor | None = None  # (B, c, 2) subject spans in the main prompt
    step: int = 0
    capture: Callable[[RouteRecord], None] | None = None
    cache: ConditionCache | None = None
    cache_write: bool = False
    candidates: torch.Tensor | None = None  # (B, n, c) bool route candidates per NOISE token
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)  # per-forward constants

    def layer(self, index: int) -> LayerRouting:
        return LayerRouting(self, index)

    def maps(self) -> tuple[SegmentMap, SegmentMap]:
        """Where each token group sits in this forward's q and in its k/v."""
        if "maps" not in self.memo:
            lay = self.layout
            cached = self.cache is not None and not self.cache_write
            self.memo["maps"] = (
                (SegmentMap.main_rows(lay), SegmentMap.cached_keys(lay)) if cached else (SegmentMap.of(lay),) * 2
            )
        return self.memo["maps"]


@dataclass
class LayerRouting:
    ctx: RoutingContext
    index: int

    def compute_routes(
        self, q: torch.Tensor, k: torch.Tensor, q_map: SegmentMap | None = None, k_map: SegmentMap | None = None
    ) -> torch.Tensor | None:
        ctx, layout = self.ctx, self.ctx.layout
        q_map = q_map or SegmentMap.of(layout)
        k_map = k_map or q_map
        if q_map.noise.stop == q_map.noise.start:
            return None
        c, given = layout.num_conditions, ctx.candidates is not None
        if not ctx.options.dynamic_active(self.index, ctx.step, c, given):
            return None
        if ctx.spans is None and c >= 2:
            raise ValueError("dynamic routing with 2+ conditions needs the subject spans of the prompt")
        candidates = None
        if given:
            key = ("candidates", q.device)
            if key not in ctx.memo:
                ctx.memo[key] = ctx.candidates.to(q.device)
            candidates = ctx.memo[key]
        with torch.no_grad():  # routes are an argmax: no gradient flows through them
            if ctx.spans is not None and (c >= 2 or ctx.capture is not None):
                affinity = self._affinity(q[:, :, q_map.noise], k[:, :, k_map.prompt])
            else:  # one subject: S* has nothing to choose, only the candidates decide
                b, h, n = q.shape[0], q.shape[1], q_map.noise.stop - q_map.noise.start
                shape = (b, h, n, 1) if ctx.options.per_head else (b, n, 1)
                affinity = torch.ones(shape, device=q.device)
            routes = routes_from_affinity(affinity, candidates)
        if ctx.capture is not None:
            ctx.capture(RouteRecord(self.index, ctx.step, affinity.detach(), routes.detach()))
        return routes

    def _affinity(self, q_noise: torch.Tensor, k_prompt: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        assert ctx.spans is not None
        h, d = q_noise.shape[1], q_noise.shape[3]
        key = ("span_values", q_noise.device, q_noise.dtype, h, d)
        if key not in ctx.memo:  # once per forward: it reads the spans on the host
            ctx.memo[key] = span_values(ctx.spans.to(q_noise.device), ctx.layout.prompt, h, d, q_noise.dtype)
        return subject_affinity_fused(
            q_noise, k_prompt, ctx.spans, per_head=ctx.options.per_head, values=ctx.memo[key]
        )

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Routed attention over (B, H, L, d) tensors (layout order unless a cache is read)."""
        ctx = self.ctx
        layout, opts = ctx.layout, ctx.options
        if ctx.cache is not None:
            if ctx.cache_write:
                ctx.cache.store(self.index, k, v)
            else:
                k, v = ctx.cache.extend(self.index, k, v)
        if layout.num_conditions == 0:
            return F.scaled_dot_product_attention(q, k, v)
        q_map, k_map = ctx.maps()
        routes = self.compute_routes(q, k, q_map, k_map)
        backend = opts.resolved_backend(q.device)
        rules = {"independent_conditions": opts.independent_conditions, "static": opts.static}
        if backend == "reference":
            mask = routed_mask(layout, routes, **rules).to(q.device)
            if q_map != SegmentMap.of(layout) or k_map != q_map:
                mask = mask[:, :, q_map.layout_positions(layout).to(q.device)]
                mask = mask[..., k_map.layout_positions(layout).to(q.device)]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if backend == "flex":
            from musar.models.flex import flex_routed_attention, flex_statics

            key = ("flex", q.device)
            if key not in ctx.memo:
                ctx.memo[key] = flex_statics(q_map, k_map, **rules, device=q.device)
            return flex_routed_attention(q, k, v, layout, routes, **rules, statics=ctx.memo[key])
        return fast_routed_attention(q, k, v, layout, routes, **rules, q_map=q_map, k_map=k_map)


def _take(x: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    parts = [x[:, :, s] for s in slices if s.stop > s.start]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: Sequence[slice]) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, _take(k, kv), _take(v, kv))


def fast_routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    routes: torch.Tensor | None,
    *,
    independent_conditions: bool = False,
    static: bool = True,
    q_map: SegmentMap | None = None,
    k_map: SegmentMap | None = None,
) -> torch.Tensor:
    """Exact routed attention without any L x L tensor (see module docstring).

    ``q_map`` / ``k_map`` say where each token group sits in q and in k/v (default: layout
    order); query groups with no rows are skipped.
    """
    qm = q_map or SegmentMap.of(layout)
    km = k_map or qm
    c = layout.num_conditions
    everything = [slice(0, km.length)]
    pieces: dict[int, torch.Tensor] = {}  # query segment start -> output rows

    def rows(s: slice) -> int:
        return s.stop - s.start

    # PROMPT queries see PROMPT + NOISE (everything without static routing).
    if rows(qm.prompt):
        pieces[qm.prompt.start] = _sdpa(q[:, :, qm.prompt], k, v, [km.prompt, km.noise] if static else everything)

    # Condition k's queries (CT^k and CI^k) see their own condition, plus NOISE unless independent.
    for i in range(c):
        ct, ci = qm.cond(i)
        if rows(ct) + rows(ci) == 0:
            continue
        kct, kci = km.cond(i)
        kv = ([kct, kci] if independent_conditions else [kct, km.noise, kci]) if static else everything
        out = _sdpa(_take(q, [ct, ci]), k, v, kv)
        for s, part in zip((ct, ci), out.split([rows(ct), rows(ci)], dim=2)):
            if rows(s):  # an empty segment may share its start with the next one
                pieces[s.start] = part

    # NOISE queries: everything, or (routed) PROMPT + NOISE + their one condition.
    if rows(qm.noise):
        qn = q[:, :, qm.noise]
        if routes is None:
            pieces[qm.noise.start] = _sdpa(qn, k, v, everything)
        else:
            # Dynamic routing restricts NOISE rows with or without static routing; route c
            # (no condition) sees PROMPT and NOISE only.
            kv_for = [[km.prompt, km.noise, *km.cond(i)] for i in range(c)] + [[km.prompt, km.noise]]
            pieces[qm.noise.start] = _routed_noise(qn, k, v, routes, kv_for)

    return torch.cat([pieces[s] for s in sorted(pieces)], dim=2)


def _routed_noise(
    qn: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routes: torch.Tensor, kv_for: list[list[slice]]
) -> torch.Tensor:
    """Bucket NOISE queries by route and run one unmasked attention per (sample[, head], route).

    ``kv_for[r]``: the key groups route value ``r`` may see (one entry per route value).
    """
    per_head = routes.dim() == 3
    c = len(kv_for)
    rows = []
    for b in range(qn.shape[0]):
        heads = range(qn.shape[1]) if per_head else [None]
        head_outs = []
        for h in heads:
            hs = slice(None) if h is None else slice(h, h + 1)
            r = routes[b, h] if per_head else routes[b]
            order = torch.argsort(r, stable=True)
            counts = torch.bincount(r, minlength=c).tolist()
            q_sorted = qn[b : b + 1, hs][:, :, order]
            kb, vb = k[b : b + 1, hs], v[b : b + 1, hs]
            outs = [
                _sdpa(part, kb, vb, kv_for[i])
                for i, part in enumerate(q_sorted.split(counts, dim=2))
                if part.shape[2] > 0
            ]
            head_outs.append(torch.cat(outs, dim=2)[:, :, torch.argsort(order)])
        rows.append(head_outs[0] if len(head_outs) == 1 else torch.cat(head_outs, dim=1))
    return torch.cat(rows, dim=0)


class MusarAttnProcessor:
    """Drop-in replacement for diffusers' ``FluxAttnProcessor`` that routes attention.

    Without a ``routing`` argument it behaves like plain FLUX attention, so a model whose
    processors were swapped still runs diffusers' own forward unchanged.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        routing: LayerRouting | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        text_len = 0
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, L, d) for SDPA
        if routing is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        else:
            out = routing.attend(q, k, v)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())
