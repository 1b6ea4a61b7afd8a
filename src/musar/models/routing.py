"""Attention routing as pure functions (docs/design.md sec. 3 and 4).

Static routing is a property of the layout alone; dynamic routing adds, for each NOISE query,
the one condition it may see (its *route*). Everything here takes tensors and a
:class:`~musar.models.layout.TokenLayout` and returns tensors: no modules, no state. The dense masks
built here are the *reference* semantics; the fast attention path never builds them.

Mask convention: ``True`` = the query row may attend to the key column.

Route values: ``0 .. c-1`` name a condition; ``c`` (:func:`no_condition`) means the token reads no
condition at all (only PROMPT and NOISE keys). S* never picks ``c``; given routes do, when a
token has no candidate (docs/design.md sec. 4a, :mod:`musar.models.boxes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from musar.models.dispatch import KernelBackend, attention
from musar.models.layout import Kind, TokenLayout


@dataclass(frozen=True)
class SegmentMap:
    """Where each token group sits along the sequence axis of one q or k/v tensor.

    The layout says which tokens exist; a map says where a tensor holds them. Attention usually
    sees every token in layout order (:meth:`of`), but the cached forward has no condition
    queries (:meth:`main_rows`) and keeps its condition keys after the main ones
    (:meth:`cached_keys`). Absent groups are empty slices, so every map of a layout has one
    (CT, CI) pair per condition.
    """

    prompt: slice
    noise: slice
    cond_text: tuple[slice, ...]
    cond_image: tuple[slice, ...]
    length: int

    @classmethod
    def of(cls, layout: TokenLayout) -> SegmentMap:
        c = range(layout.num_conditions)
        return cls(
            layout.prompt_slice,
            layout.noise_slice,
            tuple(layout.cond_text_slice(k) for k in c),
            tuple(layout.cond_image_slice(k) for k in c),
            layout.total,
        )

    @classmethod
    def main_rows(cls, layout: TokenLayout) -> SegmentMap:
        """[PROMPT, NOISE] only: the query rows of a cached forward."""
        m, n = layout.prompt, layout.noise
        none = (slice(m + n, m + n),) * layout.num_conditions
        return cls(slice(0, m), slice(m, m + n), none, none, m + n)

    @classmethod
    def cached_keys(cls, layout: TokenLayout) -> SegmentMap:
        """[PROMPT, NOISE, CT^0..CT^{c-1}, CI^0..CI^{c-1}]: main keys, then a condition cache."""
        pos = layout.prompt + layout.noise
        text, image = [], []
        for length in layout.cond_text:
            text.append(slice(pos, pos + length))
            pos += length
        for length in layout.cond_image:
            image.append(slice(pos, pos + length))
            pos += length
        return cls(slice(0, layout.prompt), slice(layout.prompt, layout.prompt + layout.noise), tuple(text), tuple(image), pos)

    @property
    def num_conditions(self) -> int:
        return len(self.cond_text)

    def cond(self, k: int) -> tuple[slice, slice]:
        return self.cond_text[k], self.cond_image[k]

    def layout_positions(self, layout: TokenLayout) -> torch.Tensor:
        """(length,) int64: the layout position of every entry of this map, in map order."""
        pairs = [(self.prompt, layout.prompt_slice), (self.noise, layout.noise_slice)]
        for k in range(self.num_conditions):
            pairs += [(self.cond_text[k], layout.cond_text_slice(k)), (self.cond_image[k], layout.cond_image_slice(k))]
        parts = [
            torch.arange(lay.start, lay.start + (mine.stop - mine.start))
            for mine, lay in sorted(pairs, key=lambda p: p[0].start)
            if mine.stop > mine.start
        ]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def static_mask(
    layout: TokenLayout,
    *,
    independent_conditions: bool = False,
    static: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(L, L) boolean mask of the static rules (docs/design.md sec. 3); NOISE -> every condition allowed."""
    if not static:
        return torch.ones(layout.total, layout.total, dtype=torch.bool, device=device)
    kind = layout.kinds(device)
    cond = layout.cond_ids(device)
    q_kind, k_kind = kind[:, None], kind[None, :]
    q_cond, k_cond = cond[:, None], cond[None, :]
    # Plain ints: torch.compile (2.13) mis-evaluates a tensor compared with an IntEnum member.
    prompt, noise = int(Kind.PROMPT), int(Kind.NOISE)
    main = (kind == prompt) | (kind == noise)
    is_cond = ~main

    prompt_q = (q_kind == prompt) & main[None, :]
    noise_q = (q_kind == noise).expand(-1, layout.total)
    cond_q = is_cond[:, None] & (k_cond == q_cond)  # same condition, CI and CT alike
    if not independent_conditions:
        cond_q = cond_q | (is_cond[:, None] & (k_kind == noise))
    return prompt_q | noise_q | cond_q


def routed_mask(
    layout: TokenLayout,
    routes: torch.Tensor | None,
    *,
    independent_conditions: bool = False,
    static: bool = True,
) -> torch.Tensor:
    """Full reference mask: static rules, then each NOISE query sees only the condition it is routed to.

    ``routes``: (B, n) or (B, H, n) route values for the NOISE queries (``c`` = no condition), or
    ``None`` for no dynamic routing. Returns (B, 1 or H, L, L) booleans (or (1, 1, L, L) without routes).
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


def check_spans(spans: torch.Tensor, prompt_len: int) -> None:
    """Every subject span must be non-empty and lie inside the prompt (reads the spans on the host)."""
    starts, lengths = spans[..., 0], spans[..., 1]
    if (lengths <= 0).any() or (starts < 0).any() or ((starts + lengths) > prompt_len).any():
        raise ValueError(f"subject spans {spans.tolist()} do not fit in a prompt of {prompt_len} tokens")


def _span_indicators(spans: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, m, c) bool: token j of the prompt lies in subject span k (no host read)."""
    starts, lengths = spans[..., 0], spans[..., 1]
    pos = torch.arange(prompt_len, device=spans.device)[None, :, None]
    return (pos >= starts[:, None, :]) & (pos < (starts + lengths)[:, None, :])


def span_weights(spans: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, m, c) averaging matrix: column k holds 1/l_k on the tokens of subject span k.

    ``spans``: (B, c, 2) int tensor of (start p_k, length l_k) in main-prompt token positions.
    """
    check_spans(spans, prompt_len)
    return _span_indicators(spans, prompt_len).float() / spans[..., 1][:, None, :].float()


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


def span_values(
    spans: torch.Tensor, prompt_len: int, heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The value side of :func:`subject_affinity_fused`, built once per forward.

    Returns (B, heads, m, head_dim) 0/1 span indicators (column k = span k, zero-padded so
    flash/cuDNN kernels, which want v as wide as q, apply) and (B, 1, 1, c) float32 lengths.
    It does not validate the spans (that reads them on the host, :func:`check_spans`), so it
    also runs inside a ``torch.compile`` graph.
    """
    c = spans.shape[1]
    inside = _span_indicators(spans, prompt_len)  # (B, m, c)
    values = F.pad(inside.to(dtype), (0, max(0, head_dim - c)))[:, None].expand(-1, heads, -1, -1)
    return values.contiguous(), spans[..., 1].to(torch.float32)[:, None, None, :]


def subject_affinity_fused(
    q_noise: torch.Tensor,
    k_prompt: torch.Tensor,
    spans: torch.Tensor,
    *,
    per_head: bool = False,
    values: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: KernelBackend = None,
) -> torch.Tensor:
    """:func:`subject_affinity` as one fused attention call; what the routed attention uses.

    S*[i, k] is noise query i's softmax over the prompt keys, summed over span k and divided by
    l_k: an attention whose values are the 0/1 span indicators. Any fused SDPA kernel computes
    it without materialising the (B, H, n, m) probabilities (the reference's float32 logits
    would cost a large part of the attention call itself), in the q/k dtype: bf16 on GPU, so
    S* carries ~3 significant digits, enough to pick a subject. Dividing by l_k in float32 after
    the call scales subjects with different span lengths exactly alike. ``values``: a cached
    :func:`span_values` for these shapes. ``backend``: the diffusers attention backend of the
    call (:mod:`musar.models.dispatch`).
    """
    h, d = q_noise.shape[1], q_noise.shape[3]
    m, c = k_prompt.shape[2], spans.shape[1]
    if c > d:  # more subjects than value columns: not worth a special kernel path
        return subject_affinity(q_noise, k_prompt, spans, per_head=per_head)
    indicators, lengths = values if values is not None else span_values(spans, m, h, d, q_noise.dtype)
    sums = attention(q_noise, k_prompt, indicators, backend=backend)[..., :c].float()
    affinity = sums / lengths.to(sums.device)
    return affinity if per_head else affinity.mean(dim=1)


def no_condition(num_conditions: int) -> int:
    """The route value of a NOISE token that reads no condition: one past the last condition."""
    return num_conditions


def routes_from_affinity(affinity: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """r_i = argmax_k S*[i, k] over the token's candidates (ties go to the lower condition index).

    ``affinity``: (B, n, c) or per head (B, H, n, c). ``candidates``: (B, n, c) bool, the
    conditions each NOISE token may be routed to (all True = free, as without candidates); the
    same for every head. A token with no candidate gets :func:`no_condition`. Masking the
    affinity rather than overriding the argmax keeps free tokens bit-identical to plain S*.
    """
    if candidates is None:
        return affinity.argmax(dim=-1)
    allowed = candidates.to(affinity.device)
    if affinity.dim() == 4:
        allowed = allowed[:, None]
    if allowed.shape[-1] != affinity.shape[-1] or allowed.shape[-2] != affinity.shape[-2]:
        raise ValueError(f"route candidates {tuple(candidates.shape)} do not match the affinity {tuple(affinity.shape)}")
    routes = affinity.masked_fill(~allowed, float("-inf")).argmax(dim=-1)
    return routes.masked_fill(~allowed.any(dim=-1), no_condition(affinity.shape[-1]))


@dataclass(frozen=True)
class RoutingAccuracy:
    """How many labelled NOISE tokens went to their true subject (docs/design.md sec. 4a)."""

    overall: float  # share of labelled tokens routed to their label; nan when none is labelled
    per_subject: dict[int, float]  # subject -> share of its tokens routed to it (subjects present only)
    labelled: int  # labelled tokens counted (x heads for per-head routes)


def routing_accuracy(routes: torch.Tensor, token_labels: torch.Tensor) -> RoutingAccuracy:
    """Share of the tokens that belong to a subject which are routed to that subject.

    ``routes``: (n,), (B, n) or per head (B, H, n) route values (``no_condition`` counts as
    wrong). ``token_labels``: (n,) or (B, n) int, the true subject of each NOISE token or -1 for
    tokens to ignore (background, mixed tokens). Per-head routes count every head.
    """
    labels = token_labels.to(routes.device).long()
    if routes.dim() == labels.dim() + 1:
        labels = labels.unsqueeze(-2).expand_as(routes)
    if routes.shape != labels.shape:
        raise ValueError(f"routes {tuple(routes.shape)} and token labels {tuple(token_labels.shape)} do not match")
    keep = labels >= 0
    hit = (routes == labels) & keep
    labelled = int(keep.sum())
    per_subject = {
        int(k): float(hit[labels == k].float().mean()) for k in labels[keep].unique().tolist()
    }
    overall = float(hit.sum()) / labelled if labelled else float("nan")
    return RoutingAccuracy(overall, per_subject, labelled)


def class_tables(
    num_conditions: int, *, independent_conditions: bool = False, static: bool = True
) -> torch.Tensor:
    """(2c + 4, c + 3) boolean table: which query class may see which key class.

    The routing rules depend on a token only through its class, so every mask in this project
    is ``table[q_class[row], k_class[col]]``. Query classes: 0 PROMPT, 1 NOISE without a route,
    2 + r NOISE with route r (r = c: no condition, see :func:`no_condition`), 3 + c + k COND k
    (CT and CI), 2c + 3 padding. Key classes: 0 PROMPT, 1 NOISE, 2 + k COND k, c + 2 padding.
    Padding sees and is seen by nothing.
    """
    c = num_conditions
    real = c + 2  # key classes that are actual tokens
    table = torch.zeros(2 * c + 4, c + 3, dtype=torch.bool)
    table[0, :real] = not static
    table[0, :2] = True
    table[1, :real] = True
    for r in range(c + 1):  # dynamic routing restricts NOISE rows with or without static routing
        table[2 + r, [0, 1]] = True
        if r < c:
            table[2 + r, 2 + r] = True
    for k in range(c):
        row = table[3 + c + k]
        if not static:
            row[:real] = True
        row[2 + k] = True
        row[1] |= not independent_conditions
    return table


def kept_fraction(mask: torch.Tensor) -> float:
    """Share of the score matrix a mask keeps (for reports)."""
    return float(mask.float().mean())
