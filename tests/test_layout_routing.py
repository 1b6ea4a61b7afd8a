"""TokenLayout and the pure routing functions (static rules, spans affinity, routes, masks)."""

from __future__ import annotations

import math

import pytest
import torch

from musar.models.layout import Kind, TokenLayout
from musar.models.options import RoutingOptions
from musar.models.routing import (
    kept_fraction,
    no_condition,
    routed_mask,
    routes_from_affinity,
    routing_accuracy,
    span_weights,
    static_mask,
    subject_affinity,
)

LAYOUT = TokenLayout(prompt=3, noise=4, cond_image=(2, 3), cond_text=(1, 2))


def test_layout_order_and_slices() -> None:
    lay = LAYOUT
    assert lay.total == 3 + 1 + 2 + 4 + 2 + 3
    assert [s.kind for s in lay.segments] == [
        Kind.PROMPT,
        Kind.COND_TEXT,
        Kind.COND_TEXT,
        Kind.NOISE,
        Kind.COND_IMAGE,
        Kind.COND_IMAGE,
    ]
    assert lay.prompt_slice == slice(0, 3)
    assert lay.cond_text_slice(0) == slice(3, 4) and lay.cond_text_slice(1) == slice(4, 6)
    assert lay.noise_slice == slice(6, 10)
    assert lay.cond_image_slice(0) == slice(10, 12) and lay.cond_image_slice(1) == slice(12, 15)
    assert lay.text_split == (3, 3) and lay.image_split == (4, 5)
    assert lay.cond_ids().tolist() == [-1, -1, -1, 0, 1, 1, -1, -1, -1, -1, 0, 0, 1, 1, 1]
    with pytest.raises(IndexError):
        lay.cond_image_slice(2)
    with pytest.raises(ValueError, match="image and a text"):
        TokenLayout(1, 1, (2,), ())


def _allowed(mask: torch.Tensor, rows: slice, cols: slice) -> bool:
    return bool(mask[rows, cols].all())


def _blocked(mask: torch.Tensor, rows: slice, cols: slice) -> bool:
    return not bool(mask[rows, cols].any())


def test_static_mask_follows_design_table() -> None:
    lay = LAYOUT
    m = static_mask(lay)
    p, x = lay.prompt_slice, lay.noise_slice
    ct0, ci0 = lay.cond_slices(0)
    ct1, ci1 = lay.cond_slices(1)
    assert _allowed(m, p, p) and _allowed(m, p, x)
    for s in (ct0, ci0, ct1, ci1):
        assert _blocked(m, p, s)  # PROMPT never sees conditions
        assert _allowed(m, x, s)  # NOISE sees every condition (statically)
    assert _allowed(m, x, p) and _allowed(m, x, x)
    for own, other in (((ct0, ci0), (ct1, ci1)), ((ct1, ci1), (ct0, ci0))):
        for q in own:
            assert _blocked(m, q, p)  # COND never sees PROMPT
            assert _allowed(m, q, x)  # ... sees NOISE (paper)
            for kk in own:
                assert _allowed(m, q, kk)  # CI and CT of one condition see each other
            for kk in other:
                assert _blocked(m, q, kk)  # never another condition
    ind = static_mask(lay, independent_conditions=True)
    for q in (ct0, ci0, ct1, ci1):
        assert _blocked(ind, q, x)
    assert static_mask(lay, static=False).all()


def test_routed_mask_restricts_noise_rows_only() -> None:
    lay = LAYOUT
    routes = torch.tensor([[0, 1, 1, 0]])
    m = routed_mask(lay, routes)[0, 0]
    base = static_mask(lay)
    x0 = lay.noise_slice.start
    for i, r in enumerate(routes[0].tolist()):
        row = m[x0 + i]
        for k in range(2):
            for s in lay.cond_slices(k):
                assert bool(row[s].all()) == (k == r)
    others = torch.ones(lay.total, dtype=torch.bool)
    others[lay.noise_slice] = False
    assert torch.equal(m[others], base[others])
    per_head = routed_mask(lay, torch.stack([routes, 1 - routes], dim=1))
    assert per_head.shape == (1, 2, lay.total, lay.total)
    assert kept_fraction(m) < kept_fraction(base)
    # Route c = no condition: PROMPT and NOISE stay visible, every condition is masked.
    none = routed_mask(lay, torch.tensor([[0, no_condition(2), 1, 0]]))[0, 0]
    row = none[x0 + 1]
    assert bool(row[lay.prompt_slice].all() and row[lay.noise_slice].all())
    assert not any(bool(row[s].any()) for k in range(2) for s in lay.cond_slices(k))
    assert torch.equal(none[x0], m[x0]) and torch.equal(none[x0 + 2], m[x0 + 2])


def test_span_weights_average_over_span() -> None:
    w = span_weights(torch.tensor([[[1, 2], [4, 1]]]), prompt_len=6)
    assert w.shape == (1, 6, 2)
    assert w[0, :, 0].tolist() == [0, 0.5, 0.5, 0, 0, 0]
    assert w[0, :, 1].tolist() == [0, 0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="do not fit"):
        span_weights(torch.tensor([[[5, 3]]]), prompt_len=6)


def test_routes_follow_constructed_affinity() -> None:
    # Prompt keys are one-hot directions; noise query i points at the span it should pick.
    d, m = 8, 6
    k_prompt = torch.zeros(1, 2, m, d)
    for j in range(m):
        k_prompt[0, :, j, j] = 1.0
    spans = torch.tensor([[[0, 2], [3, 2]]])  # subject 0 = tokens 0-1, subject 1 = tokens 3-4
    targets = [0, 3, 4, 1, 4]
    q = torch.zeros(1, 2, len(targets), d)
    for i, t in enumerate(targets):
        q[0, :, i, t] = 20.0
    aff = subject_affinity(q, k_prompt, spans)
    assert aff.shape == (1, 5, 2)
    assert routes_from_affinity(aff)[0].tolist() == [0, 1, 1, 0, 1]
    # Per head: head 1 points the other way.
    q2 = q.clone()
    q2[0, 1] = 0
    for i, t in enumerate(targets):
        q2[0, 1, i, 1 if t >= 3 else 3] = 20.0
    per_head = routes_from_affinity(subject_affinity(q2, k_prompt, spans, per_head=True))
    assert per_head[0, 0].tolist() == [0, 1, 1, 0, 1] and per_head[0, 1].tolist() == [1, 0, 0, 1, 0]
    # Chunking does not change the answer.
    assert torch.allclose(subject_affinity(q, k_prompt, spans, chunk_elems=1), aff)


def test_routing_options_validate() -> None:
    with pytest.raises(ValueError, match="backend"):
        RoutingOptions(backend="flash")  # type: ignore[arg-type]
    opts = RoutingOptions(start_layer=2, start_step=1)
    assert not opts.dynamic_active(1, 5, 2) and not opts.dynamic_active(3, 0, 2)
    assert opts.dynamic_active(2, 1, 2) and not opts.dynamic_active(2, 1, 1)
    # Given routes (boxes) act for one subject too, under the same layer/step gate.
    assert opts.dynamic_active(2, 1, 1, given=True) and not opts.dynamic_active(1, 1, 1, given=True)
    assert not RoutingOptions(dynamic=False).dynamic_active(5, 5, 2, given=True)


def test_routing_accuracy_on_constructed_routes() -> None:
    labels = torch.tensor([[0, 0, 0, 1, 1, -1], [1, 1, 0, 0, -1, -1]])
    routes = torch.tensor([[0, 0, 1, 1, 2, 0], [1, 0, 0, 0, 1, 1]])  # 2 = no condition (c = 2)
    acc = routing_accuracy(routes, labels)
    assert acc.labelled == 9
    assert acc.overall == pytest.approx(6 / 9)
    assert acc.per_subject == {0: pytest.approx(4 / 5), 1: pytest.approx(2 / 4)}
    # Per-head routes: every head is counted against the same labels.
    heads = torch.stack([routes, labels.clamp(min=0)], dim=1)
    per_head = routing_accuracy(heads, labels)
    assert per_head.labelled == 18 and per_head.overall == pytest.approx((6 + 9) / 18)
    assert routing_accuracy(torch.tensor([1, 0]), torch.tensor([1, 0])).overall == 1.0  # unbatched
    assert math.isnan(routing_accuracy(routes, torch.full_like(labels, -1)).overall)
    with pytest.raises(ValueError, match="do not match"):
        routing_accuracy(routes, labels[:, :3])
