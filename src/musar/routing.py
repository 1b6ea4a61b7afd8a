"""Attention routing as pure functions (DESIGN sec. 3 and 4).

Static routing is a property of the layout alone; dynamic routing adds, for each NOISE query,
the one condition it may see (its *route*). Everything here takes tensors and a
:class:`~musar.layout.TokenLayout` and returns tensors: no modules, no state. The dense masks
built here are the *reference* semantics; the fast attention path never builds them.

Mask convention: ``True`` = the query row may attend to the key column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from musar.layout import Kind, TokenLayout

Backend = Literal["fast", "reference"]


@dataclass
class RoutingOptions:
    """How attention is routed. Defaults reproduce the paper."""

    static: bool = field(default=True, metadata={"help": "Static routing (paper 3.2.2). Off = every token sees every token (ablation)."})
    dynamic: bool = field(default=True, metadata={"help": "Dynamic routing of NOISE queries to one condition (paper 3.3); only acts for c >= 2."})
    per_head: bool = field(default=False, metadata={"help": "Route per attention head instead of on the head-mean affinity."})
    start_layer: int = field(default=0, metadata={"help": "First layer (double blocks first, then single) where dynamic routing applies."})
    start_step: int = field(default=0, metadata={"help": "First denoising step where dynamic routing applies."})
    independent_conditions: bool = field(default=False, metadata={"help": "Also block COND -> NOISE so condition K/V can be cached (ours; needs weights trained this way)."})
    backend: Backend = field(default="fast", metadata={"help": "'fast' (no L x L mask) or 'reference' (dense mask into SDPA)."})

    def __post_init__(self) -> None:
        if self.backend not in ("fast", "reference"):
            raise ValueError(f"unknown attention backend {self.backend!r}; expected 'fast' or 'reference'")
        if self.start_layer < 0 or self.start_step < 0:
            raise ValueError("start_layer and start_step must be >= 0")

    def dynamic_active(self, layer: int, step: int, num_conditions: int) -> bool:
        return self.dynamic and num_conditions >= 2 and layer >= self.start_layer and step >= self.start_step


def static_mask(
    layout: TokenLayout,
    *,
    independent_conditions: bool = False,
    static: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(L, L) boolean mask of the static rules (DESIGN sec. 3); NOISE -> every condition allowed."""
    if not static:
        return torch.ones(layout.total, layout.total, dtype=torch.bool, device=device)
    kind = layout.kinds(device)
    cond = layout.cond_ids(device)
    q_kind, k_kind = kind[:, None], kind[None, :]
    q_cond, k_cond = cond[:, None], cond[None, :]
    main = (kind == Kind.PROMPT) | (kind == Kind.NOISE)
    is_cond = ~main

    prompt_q = (q_kind == Kind.PROMPT) & main[None, :]
    noise_q = (q_kind == Kind.NOISE).expand(-1, layout.total)
    cond_q = is_cond[:, None] & (k_cond == q_cond)  # same condition, CI and CT alike
    if not independent_conditions:
        cond_q = cond_q | (is_cond[:, None] & (k_kind == Kind.NOISE))
    return prompt_q | noise_q | cond_q


def routed_mask(
    layout: TokenLayout,
    routes: torch.Tensor | None,
    *,
    independent_conditions: bool = False,
    static: bool = True,
) -> torch.Tensor:
    """Full reference mask: static rules, then each NOISE query sees only the condition it is routed to.

    ``routes``: (B, n) or (B, H, n) condition indices for the NOISE queries, or ``None`` for no
    dynamic routing. Returns (B, 1 or H, L, L) booleans (or (1, 1, L, L) without routes).
    """
    device = routes.device if routes is not None else None
    base = static_mask(layout, independent_conditions=independent_conditions, static=static, device=device)
    if routes is None:
        return base[None, None]
    if routes.dim() == 2:
        routes = routes[:, None]
    b, h, n = routes.shape
    if n != layout.noise:
        raise ValueError(f"routes cover {n} noise tokens, layout has {layout.noise}")
    cond = layout.cond_ids(routes.device)
    # For noise rows: a COND key is allowed only when it belongs to the routed condition.
    key_is_cond = cond >= 0
    noise_rows = (~key_is_cond)[None, None, None, :] | (cond[None, None, None, :] == routes[..., None])
    mask = base[None, None].expand(b, h, -1, -1).clone()
    mask[:, :, layout.noise_slice, :] &= noise_rows
    return mask


def span_weights(spans: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, m, c) averaging matrix: column k holds 1/l_k on the tokens of subject span k.

    ``spans``: (B, c, 2) int tensor of (start p_k, length l_k) in main-prompt token positions.
    """
    starts, lengths = spans[..., 0], spans[..., 1]
    if (lengths <= 0).any() or (starts < 0).any() or ((starts + lengths) > prompt_len).any():
        raise ValueError(f"subject spans {spans.tolist()} do not fit in a prompt of {prompt_len} tokens")
    pos = torch.arange(prompt_len, device=spans.device)[None, :, None]
    inside = (pos >= starts[:, None, :]) & (pos < (starts + lengths)[:, None, :])
    return inside.float() / lengths[:, None, :].float()


def subject_affinity(
    q_noise: torch.Tensor,
    k_prompt: torch.Tensor,
    spans: torch.Tensor,
    *,
    per_head: bool = False,
    chunk_elems: int = 1 << 26,
) -> torch.Tensor:
    """S*[i, k]: mean prompt-attention of noise query i over subject span k (paper eq. 4-5).

    ``q_noise`` (B, H, n, d) and ``k_prompt`` (B, H, m, d) are exactly the q/k the attention uses
    (after RMSNorm and RoPE). The softmax runs over the m prompt keys only. Returns (B, n, c) for
    the head mean, (B, H, n, c) per head; float32. Chunked over queries so memory stays bounded.
    """
    b, h, n, d = q_noise.shape
    m = k_prompt.shape[2]
    weights = span_weights(spans, m).to(q_noise.device)  # (B, m, c)
    scale = d**-0.5
    step = max(1, chunk_elems // max(1, b * h * m))
    out = []
    for start in range(0, n, step):
        logits = torch.einsum("bhid,bhjd->bhij", q_noise[:, :, start : start + step].float(), k_prompt.float())
        probs = (logits * scale).softmax(dim=-1)
        if not per_head:
            probs = probs.mean(dim=1)  # (B, i, m)
            out.append(torch.einsum("bim,bmc->bic", probs, weights))
        else:
            out.append(torch.einsum("bhim,bmc->bhic", probs, weights))
    return torch.cat(out, dim=-2)


def routes_from_affinity(affinity: torch.Tensor) -> torch.Tensor:
    """r_i = argmax_k S*[i, k] (ties go to the lower condition index)."""
    return affinity.argmax(dim=-1)


def kept_fraction(mask: torch.Tensor) -> float:
    """Share of the score matrix a mask keeps (for reports)."""
    return float(mask.float().mean())
