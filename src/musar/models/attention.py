"""Routed joint attention: a diffusers attention processor plus interchangeable backends.

:class:`MusarAttnProcessor` plugs into diffusers' ``FluxAttention`` seam (``set_processor``).
It computes q/k/v with the module's own projections (the fused ``to_qkv`` / ``to_added_qkv`` after
``fuse_qkv_projections()``, as FLUX's processor does), RMSNorms and diffusers' RoPE, then hands
them to :class:`LayerRouting`, which

1. derives each NOISE query's route from the *same* q/k (dynamic routing, docs/design.md sec. 4), as
   one fused attention call (:func:`~musar.models.routing.subject_affinity_fused`), restricted
   to the token's given route candidates if any (layout boxes, docs/design.md sec. 4a; a token without
   candidates gets the "no condition" route, which every backend below honours), and
2. runs the attention under the routing rules with one of the backends:

* ``reference`` — a dense boolean (B, H|1, L, L) mask into one attention call. Obviously
  correct, slow.
* ``fast`` — no L x L tensor at all: one *unmasked* attention per group of queries that see
  the same keys (:mod:`musar.models.fast`); under ``torch.compile`` its NOISE rows take one
  key-masked call instead, so no host read breaks the graph.
* ``flex`` — one FlexAttention call with a block mask built from the layout and routes
  (:mod:`musar.models.flex`).
* ``auto`` — flex on CUDA, fast elsewhere (:func:`~musar.models.routing.resolve_backend`).

Every attention call except flex's goes through diffusers' attention dispatch
(:mod:`musar.models.dispatch`), so ``set_attention_backend(...)`` and the ``attention_backend``
context manager choose its kernel, exactly as for FLUX's own processor.

With a condition cache (:mod:`musar.models.cache`) the same code serves the cached forward: its q
holds only [PROMPT, NOISE] rows and its k/v get the cached condition keys appended; a
:class:`~musar.models.routing.SegmentMap` per tensor tells every backend where each group sits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from musar.errors import MusarError
from musar.models.dispatch import KernelBackend, attention, check_backend, masked_attention
from musar.models.fast import fast_routed_attention
from musar.models.layout import TokenLayout
from musar.models.options import RoutingOptions
from musar.models.routing import (
    SegmentMap,
    routed_mask,
    routes_from_affinity,
    span_values,
    subject_affinity_fused,
)

if TYPE_CHECKING:
    from musar.models.cache import ConditionCache
    from musar.models.flex import FlexStatics


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

    ``candidates`` (B, n, c) bool: given routes (docs/design.md sec. 4a). Where dynamic routing acts,
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

    def candidates_on(self, device: torch.device) -> torch.Tensor | None:
        if self.candidates is None:
            return None
        key = ("candidates", device)
        if key not in self.memo:
            self.memo[key] = self.candidates.to(device)
        return self.memo[key]

    def span_values(self, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.spans is not None
        key = ("span_values", device, dtype, heads, head_dim)
        if key not in self.memo:
            self.memo[key] = span_values(self.spans.to(device), self.layout.prompt, heads, head_dim, dtype)
        return self.memo[key]

    def flex_statics(self, device: torch.device) -> FlexStatics:
        from musar.models.flex import flex_statics

        key = ("flex", device)
        if key not in self.memo:
            q_map, k_map = self.maps()
            rules = {"independent_conditions": self.options.independent_conditions, "static": self.options.static}
            self.memo[key] = flex_statics(q_map, k_map, **rules, device=device)
        return self.memo[key]

    def check_kernel(self, backend: KernelBackend, q: torch.Tensor, routing: str) -> None:
        """:func:`~musar.models.dispatch.check_backend`, once per forward and backend."""
        key = ("kernel", backend, q.device, q.dtype)
        if key not in self.memo:
            check_backend(backend, q, routing)
            self.memo[key] = True

    def prepare(self, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> None:
        """Compute this forward's constants now, outside the blocks.

        Every layer then finds them, so under ``torch.compile`` all layers of a kind trace the
        same code (one graph) instead of the first one tracing their construction.
        """
        c, given = self.layout.num_conditions, self.candidates is not None
        if c == 0:
            return
        self.maps()
        self.candidates_on(device)
        # What compute_routes reads, where some layer routes (start_layer itself is the first).
        routes = self.options.dynamic_active(self.options.start_layer, self.step, c, given)
        if routes and self.spans is not None and (c >= 2 or self.capture is not None):
            self.span_values(device, dtype, heads, head_dim)
        if self.options.resolved_backend(device) == "flex":
            self.flex_statics(device)


@dataclass
class LayerRouting:
    """One attention layer's view of the :class:`RoutingContext`.

    ``dynamic`` (whether routes restrict NOISE rows here), ``capturing`` and ``cached`` (this
    layer's cached condition keys/values) are resolved when the layer is created, outside the
    attention, so the attention code reads no layer index or step and one compiled graph serves
    every layer and step. Inside a compiled graph the routes are kept in ``found`` and handed to
    the capture callback by :meth:`flush`, after the graph.
    """

    ctx: RoutingContext
    index: int
    dynamic: bool = field(init=False)
    capturing: bool = field(init=False)
    cached: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, repr=False)
    found: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        ctx = self.ctx
        c, given = ctx.layout.num_conditions, ctx.candidates is not None
        self.dynamic = ctx.options.dynamic_active(self.index, ctx.step, c, given)
        self.capturing = ctx.capture is not None
        self.cached = ctx.cache.kv(self.index) if ctx.cache is not None and not ctx.cache_write else None

    def _report(self, affinity: torch.Tensor, routes: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            self.found.append((affinity.detach(), routes.detach()))
        else:
            self.ctx.capture(RouteRecord(self.index, self.ctx.step, affinity.detach(), routes.detach()))

    def flush(self) -> None:
        """Hand the routes decided inside a compiled graph to the capture callback."""
        for affinity, routes in self.found:
            self.ctx.capture(RouteRecord(self.index, self.ctx.step, affinity, routes))
        self.found.clear()

    def compute_routes(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_map: SegmentMap | None = None,
        k_map: SegmentMap | None = None,
        backend: KernelBackend = None,
    ) -> torch.Tensor | None:
        ctx, layout = self.ctx, self.ctx.layout
        q_map = q_map or SegmentMap.of(layout)
        k_map = k_map or q_map
        if q_map.noise.stop == q_map.noise.start or not self.dynamic:
            return None
        c = layout.num_conditions
        if ctx.spans is None and c >= 2:
            raise ValueError("dynamic routing with 2+ conditions needs the subject spans of the prompt")
        candidates = ctx.candidates_on(q.device)
        with torch.no_grad():  # routes are an argmax: no gradient flows through them
            if ctx.spans is not None and (c >= 2 or self.capturing):
                q_noise, k_prompt = q[:, :, q_map.noise], k[:, :, k_map.prompt]
                h, d = q_noise.shape[1], q_noise.shape[3]
                affinity = subject_affinity_fused(
                    q_noise, k_prompt, ctx.spans, per_head=ctx.options.per_head,
                    values=ctx.span_values(q.device, q.dtype, h, d), backend=backend,
                )
            else:  # one subject: S* has nothing to choose, only the candidates decide
                b, h, n = q.shape[0], q.shape[1], q_map.noise.stop - q_map.noise.start
                shape = (b, h, n, 1) if ctx.options.per_head else (b, n, 1)
                affinity = torch.ones(shape, device=q.device)
            routes = routes_from_affinity(affinity, candidates)
        if self.capturing:
            self._report(affinity, routes)
        return routes

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: KernelBackend = None) -> torch.Tensor:
        """Routed attention over (B, H, L, d) tensors (layout order unless a cache is read).

        ``backend``: the diffusers attention backend of its kernel calls (None: the active one).
        """
        ctx = self.ctx
        layout, opts = ctx.layout, ctx.options
        if ctx.cache is not None:
            if ctx.cache_write:
                ctx.cache.store(self.index, k, v)
            elif self.cached is not None:
                ck, cv = self.cached
                k, v = torch.cat([k, ck.to(k.dtype)], dim=2), torch.cat([v, cv.to(v.dtype)], dim=2)
        if layout.num_conditions == 0:
            return attention(q, k, v, backend=backend)
        q_map, k_map = ctx.maps()
        routing = opts.resolved_backend(q.device)
        if not torch.compiler.is_compiling():  # checks read nothing a graph needs; once per forward
            ctx.check_kernel(backend, q, routing)
        routes = self.compute_routes(q, k, q_map, k_map, backend)
        rules = {"independent_conditions": opts.independent_conditions, "static": opts.static}
        if routing == "reference":
            mask = routed_mask(layout, routes, **rules).to(q.device)
            if q_map != SegmentMap.of(layout) or k_map != q_map:
                mask = mask[:, :, q_map.layout_positions(layout).to(q.device)]
                mask = mask[..., k_map.layout_positions(layout).to(q.device)]
            return masked_attention(q, k, v, mask, backend=backend, routing=routing)
        if routing == "flex":
            from musar.models.flex import flex_routed_attention

            return flex_routed_attention(q, k, v, layout, routes, **rules, statics=ctx.flex_statics(q.device))
        return fast_routed_attention(q, k, v, layout, routes, **rules, q_map=q_map, k_map=k_map, backend=backend)


def plain_qkv_projections(attn: nn.Module) -> bool:
    """Whether ``attn``'s q/k/v projections are bare linears, so a fused copy computes the same.

    A LoRA wrapper (MUSAR's branch host or a peft layer) is no ``nn.Linear``: fused projections
    hold only its base weight and would drop the LoRA.
    """
    names = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    return all(isinstance(getattr(attn, n), nn.Linear) for n in names if getattr(attn, n, None) is not None)


QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def qkv_projections(
    attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[QKV, QKV | None]:
    """q, k, v of the image (or joint) stream and of the text stream, (B, L, H*d) each.

    After ``fuse_qkv_projections()`` one matmul per stream (``to_qkv`` / ``to_added_qkv``), as
    diffusers' ``_get_qkv_projections``; refused if a LoRA was put on q/k/v after fusing, which
    the fused copies would silently leave out.
    """
    if attn.fused_projections:
        if not plain_qkv_projections(attn):
            raise MusarError(
                "q/k/v projections were fused and then given a LoRA, which the fused projections leave out; "
                "call transformer.unfuse_qkv_projections() (fuse again once the LoRA is unloaded)"
            )
        image = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        text = None if encoder_hidden_states is None else attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return image, text
    image = (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
    if encoder_hidden_states is None:
        return image, None
    e = encoder_hidden_states
    return image, (attn.add_q_proj(e), attn.add_k_proj(e), attn.add_v_proj(e))


@dataclass(frozen=True)
class AttentionCapture:
    """What one attention layer scores with, handed to a processor's ``capture`` hook.

    ``query``/``key`` are (B, H, L, d) exactly as attention uses them (after the RMSNorms and
    RoPE), with their autograd graph, so a training loss may be built on them; a hook that only
    measures should detach. ``text_len``: the prompt tokens at the front of a double block's
    sequence (None in single blocks, whose input is already joint). ``routing``: the layer's
    routing in a conditioned forward (its layout, spans and step), None in a plain one.
    """

    query: torch.Tensor
    key: torch.Tensor
    text_len: int | None
    routing: LayerRouting | None


class MusarAttnProcessor:
    """Drop-in replacement for diffusers' ``FluxAttnProcessor`` that routes attention.

    Without a ``routing`` argument it computes what ``FluxAttnProcessor`` computes, through the
    same dispatch call, so a model whose processors were swapped still runs diffusers' own
    forward unchanged. ``set_attention_backend`` sets ``_attention_backend`` on it as on
    FLUX's processor; the routed calls use that backend too.

    ``capture``: called with an :class:`AttentionCapture` in every forward (per-layer S*, q/k
    probes, a grounding loss); it observes and changes nothing the layer computes. Give each layer
    its own processor when capturing, since diffusers may share one instance between layers.
    """

    _attention_backend: KernelBackend = None
    _parallel_config: Any = None

    def __init__(self, capture: Callable[[AttentionCapture], None] | None = None) -> None:
        self.capture = capture

    def keeping_backend_of(self, old: object) -> MusarAttnProcessor:
        """This processor with ``old``'s attention backend and parallel config (what
        ``set_attention_backend`` / ``enable_parallelism`` set on the processor it replaces)."""
        self._attention_backend = getattr(old, "_attention_backend", None)
        self._parallel_config = getattr(old, "_parallel_config", None)
        return self

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

        (q, k, v), text = qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = attn.norm_q(heads(q)), attn.norm_k(heads(k)), heads(v)
        text_len = 0
        if text is not None:
            text_len = text[0].shape[1]
            query = torch.cat([attn.norm_added_q(heads(text[0])), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(text[1])), key], dim=1)
            value = torch.cat([heads(text[2]), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if self.capture is not None:
            self.capture(AttentionCapture(query.transpose(1, 2), key.transpose(1, 2),
                                          text_len if text is not None else None, routing))
        if routing is None:  # FLUX's own call, (B, L, H, d)
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        else:
            if self._parallel_config is not None:
                raise MusarError("context parallelism cannot split MUSAR's routed attention; run routed forwards unsharded")
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, L, d)
            out = routing.attend(q, k, v, backend=self._attention_backend).transpose(1, 2)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())
