"""Routed joint attention: a diffusers attention processor plus two interchangeable backends.

:class:`MusarAttnProcessor` plugs into diffusers' ``FluxAttention`` seam (``set_processor``).
It computes q/k/v with the module's own projections, RMSNorms and diffusers' RoPE, then hands
them to :class:`LayerRouting`, which

1. derives each NOISE query's route from the *same* q/k (dynamic routing, DESIGN sec. 4), and
2. runs the attention under the routing rules with one of two backends:

* ``reference`` — a dense boolean (B, H|1, L, L) mask into SDPA. Obviously correct, slow.
* ``fast`` — no L x L tensor at all: queries are grouped by what they may see (PROMPT, each
  condition, and NOISE queries bucketed by route), and each group runs one *unmasked* SDPA over
  exactly the keys it may see. Work is proportional to the unmasked blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from musar.layout import TokenLayout
from musar.routing import RoutingOptions, routed_mask, routes_from_affinity, subject_affinity


@dataclass
class RouteRecord:
    """What dynamic routing decided in one layer at one step (for Fig.-5 style maps)."""

    layer: int
    step: int
    affinity: torch.Tensor  # (B, n, c) head-mean, or (B, H, n, c) per head; float32, CPU
    routes: torch.Tensor  # (B, n) or (B, H, n); int64, CPU


@dataclass
class RoutingContext:
    """Everything one transformer forward needs to route attention; shared by all its layers."""

    layout: TokenLayout
    options: RoutingOptions = field(default_factory=RoutingOptions)
    spans: torch.Tensor | None = None  # (B, c, 2) subject spans in the main prompt
    step: int = 0
    capture: Callable[[RouteRecord], None] | None = None

    def layer(self, index: int) -> LayerRouting:
        return LayerRouting(self, index)


@dataclass
class LayerRouting:
    ctx: RoutingContext
    index: int

    def compute_routes(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        ctx, layout = self.ctx, self.ctx.layout
        if not ctx.options.dynamic_active(self.index, ctx.step, layout.num_conditions):
            return None
        if ctx.spans is None:
            raise ValueError("dynamic routing with 2+ conditions needs the subject spans of the prompt")
        with torch.no_grad():  # routes are an argmax: no gradient flows through them
            affinity = subject_affinity(
                q[:, :, layout.noise_slice], k[:, :, layout.prompt_slice], ctx.spans, per_head=ctx.options.per_head
            )
            routes = routes_from_affinity(affinity)
        if ctx.capture is not None:
            ctx.capture(RouteRecord(self.index, ctx.step, affinity.detach().cpu(), routes.detach().cpu()))
        return routes

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Routed attention over (B, H, L, d) tensors in layout order."""
        ctx = self.ctx
        layout, opts = ctx.layout, ctx.options
        if layout.num_conditions == 0:
            return F.scaled_dot_product_attention(q, k, v)
        routes = self.compute_routes(q, k)
        if opts.backend == "reference":
            mask = routed_mask(layout, routes, independent_conditions=opts.independent_conditions, static=opts.static)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device))
        return fast_routed_attention(
            q, k, v, layout, routes, independent_conditions=opts.independent_conditions, static=opts.static
        )


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
) -> torch.Tensor:
    """Exact routed attention without any L x L tensor (see module docstring)."""
    c = layout.num_conditions
    everything = [slice(0, layout.total)]
    prompt, noise = layout.prompt_slice, layout.noise_slice
    pieces: dict[int, torch.Tensor] = {}  # query segment start -> output rows

    # PROMPT queries see PROMPT + NOISE (everything without static routing).
    pieces[prompt.start] = _sdpa(q[:, :, prompt], k, v, [prompt, noise] if static else everything)

    # Condition k's queries (CT^k and CI^k) see their own condition, plus NOISE unless independent.
    for i in range(c):
        ct, ci = layout.cond_slices(i)
        kv = ([ct, ci] if independent_conditions else [ct, noise, ci]) if static else everything
        out = _sdpa(_take(q, [ct, ci]), k, v, kv)
        pieces[ct.start], pieces[ci.start] = out.split([ct.stop - ct.start, ci.stop - ci.start], dim=2)

    # NOISE queries: everything, or (routed) PROMPT + NOISE + their one condition.
    qn = q[:, :, noise]
    if routes is None:
        pieces[noise.start] = _sdpa(qn, k, v, everything)
    else:
        # Dynamic routing restricts NOISE rows with or without static routing.
        kv_for = [[prompt, noise, *layout.cond_slices(i)] for i in range(c)]
        pieces[noise.start] = _routed_noise(qn, k, v, routes, kv_for)

    return torch.cat([pieces[s] for s in sorted(pieces)], dim=2)


def _routed_noise(
    qn: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routes: torch.Tensor, kv_for: list[list[slice]]
) -> torch.Tensor:
    """Bucket NOISE queries by route and run one unmasked attention per (sample[, head], route)."""
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
