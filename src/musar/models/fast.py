"""The ``fast`` backend: exact routed attention as unmasked calls over token groups.

No L x L tensor: queries are grouped by what they may see (PROMPT, each condition, and NOISE
queries bucketed by route), and each group runs one *unmasked* attention over exactly the keys
it may see, so work is proportional to the unmasked blocks and any fast kernel applies. Every
call goes through diffusers' attention dispatch (:mod:`musar.models.dispatch`).

Bucketing NOISE queries by route reads the route counts on the host (``bincount().tolist()``),
a graph break under ``torch.compile``. With ``sync_free`` (on by default inside a compiled
graph) the NOISE rows instead run one call over all keys with a (B, H|1, n, L) boolean mask
built from the routes: the same result, static shapes, no host read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from musar.models.dispatch import KernelBackend, attention, masked_attention
from musar.models.layout import TokenLayout
from musar.models.routing import SegmentMap


def _take(x: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    parts = [x[:, :, s] for s in slices if s.stop > s.start]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


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
    backend: KernelBackend = None,
    sync_free: bool | None = None,
) -> torch.Tensor:
    """Exact routed attention without any L x L tensor (see module docstring).

    ``q_map`` / ``k_map`` say where each token group sits in q and in k/v (default: layout
    order); query groups with no rows are skipped. ``backend``: the diffusers attention backend
    of every call. ``sync_free``: route the NOISE rows with one key-masked call instead of one
    unmasked call per route (no host read, so it traces under ``torch.compile``); default: only
    inside a compiled graph.
    """
    if sync_free is None:
        sync_free = torch.compiler.is_compiling()
    qm = q_map or SegmentMap.of(layout)
    km = k_map or qm
    c = layout.num_conditions
    everything = [slice(0, km.length)]
    pieces: dict[int, torch.Tensor] = {}  # query segment start -> output rows

    def rows(s: slice) -> int:
        return s.stop - s.start

    def attend(qs: torch.Tensor, kv: Sequence[slice]) -> torch.Tensor:
        return attention(qs, _take(k, kv), _take(v, kv), backend=backend)

    # PROMPT queries see PROMPT + NOISE (everything without static routing).
    if rows(qm.prompt):
        pieces[qm.prompt.start] = attend(q[:, :, qm.prompt], [km.prompt, km.noise] if static else everything)

    # Condition k's queries (CT^k and CI^k) see their own condition, plus NOISE unless independent.
    for i in range(c):
        ct, ci = qm.cond(i)
        if rows(ct) + rows(ci) == 0:
            continue
        kct, kci = km.cond(i)
        kv = ([kct, kci] if independent_conditions else [kct, km.noise, kci]) if static else everything
        out = attend(_take(q, [ct, ci]), kv)
        for s, part in zip((ct, ci), out.split([rows(ct), rows(ci)], dim=2)):
            if rows(s):  # an empty segment may share its start with the next one
                pieces[s.start] = part

    # NOISE queries: everything, or (routed) PROMPT + NOISE + their one condition.
    if rows(qm.noise):
        qn = q[:, :, qm.noise]
        if routes is None:
            pieces[qm.noise.start] = attend(qn, everything)
        else:
            # Dynamic routing restricts NOISE rows with or without static routing; route c
            # (no condition) sees PROMPT and NOISE only.
            kv_for = [[km.prompt, km.noise, *km.cond(i)] for i in range(c)] + [[km.prompt, km.noise]]
            if sync_free:
                pieces[qm.noise.start] = _routed_noise_masked(qn, k, v, routes, kv_for, backend)
            else:
                pieces[qm.noise.start] = _routed_noise(qn, k, v, routes, kv_for, backend)

    return torch.cat([pieces[s] for s in sorted(pieces)], dim=2)


def _routed_noise(
    qn: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routes: torch.Tensor,
    kv_for: list[list[slice]],
    backend: KernelBackend,
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
            counts = torch.bincount(r, minlength=c).tolist()  # the host read compile avoids
            q_sorted = qn[b : b + 1, hs][:, :, order]
            kb, vb = k[b : b + 1, hs], v[b : b + 1, hs]
            outs = [
                attention(part, _take(kb, kv_for[i]), _take(vb, kv_for[i]), backend=backend)
                for i, part in enumerate(q_sorted.split(counts, dim=2))
                if part.shape[2] > 0
            ]
            head_outs.append(torch.cat(outs, dim=2)[:, :, torch.argsort(order)])
        rows.append(head_outs[0] if len(head_outs) == 1 else torch.cat(head_outs, dim=1))
    return torch.cat(rows, dim=0)


def _routed_noise_masked(
    qn: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routes: torch.Tensor,
    kv_for: list[list[slice]],
    backend: KernelBackend,
) -> torch.Tensor:
    """NOISE rows as one attention call over all keys, each row masked to its route's keys.

    Static shapes and no host read, so it traces under ``torch.compile``; the mask is
    (B, H|1, n, L) booleans (n x L, not L x L). Every route sees PROMPT and NOISE, so no row is
    fully masked.
    """
    visible = torch.zeros(len(kv_for), k.shape[2], dtype=torch.bool, device=k.device)
    for r, groups in enumerate(kv_for):
        for s in groups:
            visible[r, s] = True
    mask = visible[routes]  # (B, n, L) or per head (B, H, n, L)
    return masked_attention(qn, k, v, mask if routes.dim() == 3 else mask[:, None], backend=backend, routing="fast")
