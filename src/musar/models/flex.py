"""The ``flex`` backend: routed attention as one FlexAttention call with a block-sparse mask.

The mask is never evaluated element by element to find the blocks (``create_block_mask`` is
slow eager; bench/README.md has the reference numbers). Routing depends on a token only through
its *class* (:func:`musar.models.routing.class_tables`), so

1. every query row gets a class (NOISE rows: one class per route, "no condition" included) and
   the queries are sorted by class. PROMPT, NOISE routed to condition 0, NOISE routed to 1, ...,
   NOISE routed to no condition, COND 0, COND 1, ... then form contiguous runs, so a query block
   mostly holds one class and whole key blocks of the conditions it may not see drop out (sorted
   beats unsorted; bench/README.md has the numbers);
2. a block's classes are a tiny (classes) 0/1 vector; two small matmuls against the class
   table say whether a (query block, key block) pair has any allowed pair (kept) and any
   forbidden pair (partial, needs the mask_mod) — no L x L tensor, O(L x classes) work;
3. ``BlockMask.from_kv_blocks`` takes those block lists directly;
4. the ``mask_mod`` for partial blocks is two index lookups into (L,) class tensors and one
   into the table.

Keys stay where they are (no K/V copy); only queries are permuted and the output permuted
back. All of it is tensor ops without host syncs, so it traces under ``torch.compile``.

Requirements. On CUDA the attention runs through ``torch.compile(flex_attention)`` (compiled
once per shape family on first use; needs Triton, which ships with CUDA wheels of torch), and
works forward and backward. Inside a model that is itself under ``torch.compile`` the plain
``flex_attention`` is called and the outer compile fuses it. On CPU torch 2.13 offers only the
eager, unfused implementation: it applies the ``mask_mod`` to a materialised score matrix
(block lists unused), has no backward, and exists here for tests — ``auto`` never picks flex
off CUDA.

Why not through diffusers' attention dispatch (:mod:`musar.models.dispatch`), like every other
call: its ``flex`` backend calls the eager ``flex_attention``, which outside a compiled model is
the unfused implementation above even on CUDA (the whole score matrix, far slower than any
kernel), and it would also take over the choice of tile sizes. The routed block mask is this
module's whole point, so it keeps its compiled kernel; the attention backend set on the model
still serves the S* affinity call of every flex-routed layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from musar.models.layout import TokenLayout
from musar.models.routing import SegmentMap, class_tables

BLOCK_SIZE = 128  # FlexAttention's default sparse block; its GPU kernels tile inside it

_compiled_flex: Callable[..., torch.Tensor] | None = None


def _flex_kernel(device: torch.device) -> Callable[..., torch.Tensor]:
    global _compiled_flex
    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


@dataclass(frozen=True)
class FlexStatics:
    """The route-independent part of a block mask; identical for every layer of a forward."""

    table: torch.Tensor  # (Qc, Kc) bool, see class_tables
    q_base: torch.Tensor  # (Lq,) int64 query class per row in input order, NOISE rows unrouted
    k_class: torch.Tensor  # (nKB * block,) int64 key class per column, padded
    kv_ok: torch.Tensor  # (Qc, nKB) float: > 0 where a query class sees some key of the block
    kv_bad: torch.Tensor  # (Qc, nKB) float: > 0 where it is refused some key of the block
    noise: slice  # NOISE rows of q
    num_conditions: int
    q_len: int
    k_len: int
    block_size: int


def _classes_per_row(
    m: SegmentMap, cond_class: Callable[[int], int], pad: int, length: int, device: torch.device
) -> torch.Tensor:
    """Class of every position of a map (NOISE = 1, i.e. unrouted); ``pad`` beyond its end."""
    out = torch.full((length,), pad, dtype=torch.long, device=device)
    out[m.prompt] = 0
    out[m.noise] = 1
    for k in range(m.num_conditions):
        out[m.cond_text[k]] = cond_class(k)
        out[m.cond_image[k]] = cond_class(k)
    return out


def _present(classes: torch.Tensor, num_classes: int, block: int) -> torch.Tensor:
    """(..., blocks, num_classes) 0/1 float: which classes occur in each block of ``classes``."""
    blocks = classes.view(*classes.shape[:-1], -1, block)
    out = torch.zeros(*blocks.shape[:-1], num_classes, device=classes.device)
    return out.scatter_(-1, blocks, 1.0)


def flex_statics(
    q_map: SegmentMap,
    k_map: SegmentMap,
    *,
    independent_conditions: bool = False,
    static: bool = True,
    block_size: int = BLOCK_SIZE,
    device: torch.device | str = "cpu",
) -> FlexStatics:
    """Class tables, key classes and per-class key-block coverage for one (q map, k map) pair."""
    device = torch.device(device)
    c = q_map.num_conditions
    table = class_tables(c, independent_conditions=independent_conditions, static=static).to(device)
    q_pad, k_pad = table.shape[0] - 1, table.shape[1] - 1
    q_base = _classes_per_row(q_map, lambda k: 3 + c + k, q_pad, q_map.length, device)
    k_len_padded = math.ceil(k_map.length / block_size) * block_size
    k_class = _classes_per_row(k_map, lambda k: 2 + k, k_pad, k_len_padded, device)
    k_present = _present(k_class, table.shape[1], block_size)  # (nKB, Kc)
    kv_ok = table.float() @ k_present.T
    kv_bad = (~table).float() @ k_present.T
    return FlexStatics(table, q_base, k_class, kv_ok, kv_bad, q_map.noise, c, q_map.length, k_map.length, block_size)


@dataclass(frozen=True)
class FlexPlan:
    """Query order, per-row classes and the block mask of one routed call."""

    q_order: torch.Tensor  # (B, Hr, Lq) int64: input row at each sorted position
    q_class: torch.Tensor  # (B, Hr, nQB * block) int64 class of each sorted row, padded
    partial: torch.Tensor  # (B, Hr, nQB, nKB) bool: block needs the mask_mod
    full: torch.Tensor  # (B, Hr, nQB, nKB) bool: block is attended without a mask_mod
    block_mask: BlockMask


def _block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num = blocks.sum(-1, dtype=torch.int32)
    # Stable descending sort puts the kept block indices first, in ascending order.
    order = torch.argsort(blocks.to(torch.int16), dim=-1, descending=True, stable=True)
    return num, order.to(torch.int32)


def _mask_mod(table: torch.Tensor, q_class: torch.Tensor, k_class: torch.Tensor) -> Callable[..., torch.Tensor]:
    # Closures over tensors only: torch lifts them out of the BlockMask as graph inputs, so a
    # new mask per layer and step reuses the compiled kernel instead of recompiling.
    if q_class.shape[1] == 1:
        per_sample = q_class[:, 0]

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return table[per_sample[b, q_idx], k_class[kv_idx]]

        return mask_mod

    def mask_mod_per_head(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return table[q_class[b, h, q_idx], k_class[kv_idx]]

    return mask_mod_per_head


def flex_plan(
    statics: FlexStatics,
    routes: torch.Tensor | None,
    batch: int,
    *,
    separate_full: bool = True,
    backward: bool = True,
) -> FlexPlan:
    """Sort queries by class and list each query block's kept key blocks.

    ``routes``: (B, n) or (B, H, n) or None. ``separate_full=False`` lists every kept block as
    partial (same result, mask_mod everywhere; for kernels that mishandle full-block lists).
    ``backward=False`` skips the transposed (per key block) lists only the backward pass reads.
    """
    s = statics
    bs = s.block_size
    if routes is None:
        q_in = s.q_base.expand(batch, 1, -1)
    else:
        routes = routes[:, None] if routes.dim() == 2 else routes
        q_in = s.q_base.expand(batch, routes.shape[1], -1).clone()
        q_in[..., s.noise] = 2 + routes.to(q_in.device)
    q_sorted, q_order = torch.sort(q_in, dim=-1, stable=True)
    nqb = math.ceil(s.q_len / bs)
    q_class = F.pad(q_sorted, (0, nqb * bs - s.q_len), value=s.table.shape[0] - 1)
    present = _present(q_class, s.table.shape[0], bs)  # (B, Hr, nQB, Qc)
    kept = (present @ s.kv_ok) > 0
    if separate_full:
        partial = kept & ((present @ s.kv_bad) > 0)
        full = kept & ~partial
    else:
        partial, full = kept, torch.zeros_like(kept)
    num, idx = _block_lists(partial)
    full_num, full_idx = _block_lists(full)
    block_mask = BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx,
        BLOCK_SIZE=bs,
        mask_mod=_mask_mod(s.table, q_class, s.k_class),
        seq_lengths=(s.q_len, s.k_len),
        compute_q_blocks=backward,
    )
    return FlexPlan(q_order, q_class, partial, full, block_mask)


def flex_routed_attention(
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
    statics: FlexStatics | None = None,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Exact routed attention through FlexAttention; same contract as ``fast_routed_attention``."""
    if statics is None:
        statics = flex_statics(
            q_map or SegmentMap.of(layout),
            k_map or SegmentMap.of(layout),
            independent_conditions=independent_conditions,
            static=static,
            block_size=block_size,
            device=q.device,
        )
    b, h = q.shape[:2]
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    plan = flex_plan(statics, routes, b, backward=backward)
    bi = torch.arange(b, device=q.device)[:, None, None]
    hi = torch.arange(h, device=q.device)[None, :, None]
    out = _flex_kernel(q.device)(q[bi, hi, plan.q_order], k, v, block_mask=plan.block_mask)
    arange = torch.arange(statics.q_len, device=q.device).expand_as(plan.q_order)
    inverse = torch.empty_like(plan.q_order).scatter_(-1, plan.q_order, arange)
    return out[bi, hi, inverse]


def block_stats(statics: FlexStatics, plan: FlexPlan) -> dict[str, float]:
    """How much of the score matrix a routed call keeps, per element and per block tile."""
    qc, kc = statics.table.shape
    q_hist = torch.zeros(*plan.q_class.shape[:-1], qc, device=plan.q_class.device)
    q_hist.scatter_add_(-1, plan.q_class, torch.ones_like(plan.q_class, dtype=q_hist.dtype))
    k_hist = torch.bincount(statics.k_class, minlength=kc).to(q_hist)
    kept = (q_hist @ statics.table.to(q_hist) @ k_hist).mean() / (statics.q_len * statics.k_len)
    total = max(1, plan.partial.numel())
    return {
        "kept_fraction": float(kept),
        "block_kept_fraction": int((plan.partial | plan.full).sum()) / total,
        "block_partial_fraction": int(plan.partial.sum()) / total,
    }
