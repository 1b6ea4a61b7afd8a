"""Layout boxes and given routes: the pure rules, then their effect in one routed attention layer.

In one attention layer a NOISE token reads a condition only through that condition's keys and
values, so a token whose centre lies in box k alone must not move, bit for bit, when any other
condition changes. That is checked here for c = 1..4, every backend, with and without the
condition cache, head-mean and per-head. Through a whole transformer other tokens carry
condition j onward, so there the routes themselves are checked (tests/test_boxes_pipeline.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from musar.errors import MusarError
from musar.models.attention import RouteRecord, RoutingContext
from musar.models.boxes import (
    box_candidates,
    check_box,
    check_boxes,
    parse_box_args,
    parse_box_text,
    token_box_membership,
    token_labels_from_boxes,
)
from musar.models.cache import ConditionCache
from musar.models.layout import TokenLayout
from musar.models.options import RoutingOptions
from musar.models.routing import SegmentMap, routes_from_affinity

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

GRID = (4, 4)  # token centres at 0.125, 0.375, 0.625, 0.875 on both axes
# Four quadrant-ish boxes: 0-2 are quadrants, 3 covers the centre and overlaps all of them; the
# bottom-right corner lies outside every box.
BOXES = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.25, 0.25, 0.75, 0.75)]


def _token(row: int, col: int) -> int:
    return row * GRID[1] + col


# ---- boxes -> candidates (pure) ------------------------------------------------------------


def test_candidates_follow_the_box_rules() -> None:
    cand = box_candidates(BOXES, GRID)
    assert cand.shape == (16, 4) and cand.dtype == torch.bool
    assert cand[_token(0, 0)].tolist() == [True, False, False, False]  # one box: fixed
    assert cand[_token(0, 3)].tolist() == [False, True, False, False]
    assert cand[_token(1, 1)].tolist() == [True, False, False, True]  # two boxes: S* picks among them
    assert cand[_token(3, 3)].tolist() == [True] * 4  # no box: S* picks among all
    none = box_candidates(BOXES, GRID, "none")
    assert none[_token(3, 3)].tolist() == [False] * 4  # no box, outside "none": no condition
    assert torch.equal(none[_token(1, 1)], cand[_token(1, 1)])


def test_subject_without_box_and_edges() -> None:
    # Subject 1 has no box: it is a candidate only outside every box.
    cand = box_candidates([(0.0, 0.0, 0.5, 1.0), None], GRID)
    assert cand[_token(2, 0)].tolist() == [True, False] and cand[_token(2, 3)].tolist() == [True, True]
    # Closed intervals: a centre exactly on the shared edge is in both boxes (3 columns: 0.5 is a centre).
    both = box_candidates([(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)], (1, 3))
    assert both.tolist() == [[True, False], [True, True], [False, True]]
    # Any aspect: a 2 x 8 grid, a thin box one token wide.
    wide = token_box_membership([(0.125, 0.0, 0.25, 1.0)], (2, 8))
    assert wide[:, 0].nonzero().flatten().tolist() == [1, 9]


def test_single_subject_box_restricts_its_reference() -> None:
    # One subject: S* has nothing to choose, so outside its box a token reads nothing.
    for outside in ("all", "none"):
        cand = box_candidates([BOXES[0]], GRID, outside)
        assert cand[:, 0].tolist() == token_box_membership([BOXES[0]], GRID)[:, 0].tolist()
    # Without a box it reads its reference everywhere (outside "all"), as without boxes.
    assert box_candidates([None], GRID).all()


def test_token_labels_mark_tokens_in_exactly_one_box() -> None:
    labels = token_labels_from_boxes(BOXES, GRID)
    assert labels[_token(0, 0)] == 0 and labels[_token(1, 1)] == -1 and labels[_token(3, 3)] == -1
    assert labels[_token(2, 2)] == 3 and labels[_token(3, 0)] == 2


# ---- box checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("boxes", "kwargs", "needle"),
    [
        ([(0.0, 0.0, 1.2, 1.0)], {}, "box 1 (0, 0, 1.2, 1): coordinates are fractions of the image in [0, 1], got 1.2"),
        ([(-0.1, 0.0, 0.5, 1.0)], {}, "got -0.1"),
        ([(0.0, math.nan, 0.5, 1.0)], {}, "coordinates must be finite numbers, got nan"),
        ([(0.0, 0.0, math.inf, 1.0)], {}, "finite"),
        ([(0.6, 0.0, 0.4, 1.0)], {}, "x1 must be greater than x0"),
        ([(0.0, 0.5, 1.0, 0.5)], {}, "y1 must be greater than y0"),
        ([(0.0, 0.0, 0.2, 1.0)], {}, "box 1 (0, 0, 0.2, 1) is 12.8x64 px at 64x64, smaller than one 16x16 px token"),
        ([(0.0, 0.0, 0.5, 1.0)], {"num": 2}, "got 1 boxes for 2 subjects"),
        ([(0.0, 0.0, 0.5, 1.0)], {"dynamic_routing": False}, "boxes steer dynamic routing, which is switched off"),
        (None, {"outside": "none"}, "outside_boxes='none' needs boxes"),
        ([(0.0, 0.0, 0.5, 1.0)], {"outside": "some"}, "outside_boxes must be one of all, none"),
        ([(0.0, 0.0, 0.5)], {}, "box 1 must be 4 numbers"),
    ],
)
def test_bad_boxes_are_one_line_user_errors(boxes: list | None, kwargs: dict, needle: str) -> None:
    num = kwargs.pop("num", 1)
    with pytest.raises(MusarError) as err:
        check_boxes(boxes, num, 64, 64, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_good_boxes_pass_through() -> None:
    assert check_boxes(None, 2, 64, 64) is None
    assert check_boxes([[0, 0, 0.25, 1], None], 2, 64, 64) == [(0.0, 0.0, 0.25, 1.0), None]
    # One token is the minimum, at the model's token size.
    assert check_box((0.0, 0.0, 0.125, 0.125), 64, 64, token_px=8) == (0.0, 0.0, 0.125, 0.125)
    with pytest.raises(MusarError, match="smaller than one 16x16"):
        check_box((0.0, 0.0, 0.125, 0.125), 64, 64)


def test_box_text_and_cli_parsing() -> None:
    assert parse_box_text("0.1 0.2 0.6 0.9") == (0.1, 0.2, 0.6, 0.9)
    assert parse_box_text("(0.1, 0.2, 0.6, 0.9)") == (0.1, 0.2, 0.6, 0.9)
    assert parse_box_text("  ") is None and parse_box_text(None) is None and parse_box_text("None") is None
    with pytest.raises(MusarError, match="4 numbers"):
        parse_box_text("0.1 0.2")
    assert parse_box_args(None, 2) is None
    assert parse_box_args([["0", "0", "0.5", "1"], ["none"]], 2) == [(0.0, 0.0, 0.5, 1.0), None]
    with pytest.raises(MusarError, match="got 1 --box for 2 subjects"):
        parse_box_args([["0", "0", "0.5", "1"]], 2)
    with pytest.raises(MusarError, match="--box 1 takes 4 numbers"):
        parse_box_args([["0", "0", "x", "1"]], 1)


# ---- given routes in the argmax ------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
def test_candidates_mask_the_argmax(per_head: bool) -> None:
    g = torch.Generator().manual_seed(0)
    aff = torch.rand((2, 3, 16, 4) if per_head else (2, 16, 4), generator=g)
    cand = box_candidates(BOXES, GRID, "none")[None].expand(2, -1, -1)
    routes = routes_from_affinity(aff, cand)
    free = routes_from_affinity(aff)
    heads = aff.shape[1] if per_head else 1
    r = routes.reshape(2, heads, 16)
    f = free.reshape(2, heads, 16)
    a = aff.reshape(2, heads, 16, 4)
    for i in range(16):
        options = cand[0, i].nonzero().flatten()
        if len(options) == 0:
            assert (r[:, :, i] == 4).all()  # no candidate: route c, "no condition"
        else:
            best = options[a[:, :, i, options].argmax(-1)]
            assert torch.equal(r[:, :, i], best)
    assert torch.equal(routes_from_affinity(aff, torch.ones_like(cand)), free)  # all free = plain S*
    assert not torch.equal(r, f)


# ---- one routed attention layer: a token in box k ignores every other condition -------------

B, H, D = 2, 2, 16


def _layout(c: int) -> TokenLayout:
    return TokenLayout(prompt=6, noise=16, cond_image=(4,) * c, cond_text=(2,) * c)


def _layer_noise_out(
    c: int, backend: str, cached: bool, per_head: bool, qkv: tuple[torch.Tensor, ...],
    candidates: torch.Tensor | None, records: list[RouteRecord] | None = None,
) -> torch.Tensor:
    """NOISE rows of one routed attention call (layer 0) on layout-order q/k/v."""
    lay = _layout(c)
    opts = RoutingOptions(backend=backend, per_head=per_head, independent_conditions=cached)  # type: ignore[arg-type]
    spans = torch.tensor([[[k, 1] for k in range(c)]] * B)
    capture = records.append if records is not None else None
    q, k, v = qkv
    if not cached:
        ctx = RoutingContext(lay, opts, spans, capture=capture, candidates=candidates)
        return ctx.layer(0).attend(q, k, v)[:, :, lay.noise_slice]
    main = SegmentMap.main_rows(lay).layout_positions(lay)
    cond = SegmentMap.cached_keys(lay).layout_positions(lay)[len(main):]
    cache = ConditionCache(lay.cond_image, lay.cond_text, opts, spans, torch.zeros(B, 4), None, candidates=candidates)
    cache.store(0, k[:, :, cond], v[:, :, cond])
    ctx = RoutingContext(lay, opts, spans, capture=capture, cache=cache, candidates=cache.candidates)
    return ctx.layer(0).attend(q[:, :, main], k[:, :, main], v[:, :, main])[:, :, lay.prompt :]


def _qkv(c: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, _layout(c).total, D, generator=g) for _ in range(3))


def _perturb(qkv: tuple[torch.Tensor, ...], c: int, conds: list[int], seed: int = 1) -> tuple[torch.Tensor, ...]:
    """New q/k/v rows for conditions ``conds`` (their CI and CT): what a new reference image and
    phrase give the attention; every other row is untouched."""
    lay = _layout(c)
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in qkv:
        x = x.clone()
        for j in conds:
            for s in lay.cond_slices(j):
                x[:, :, s] = torch.randn(x[:, :, s].shape, generator=g)
        out.append(x)
    return tuple(out)


CASES = [
    (c, backend, cached, per_head)
    for c in (1, 2, 3, 4)
    for backend in ("reference", "fast", "flex")
    for cached in (False, True)
    for per_head in (False, True)
]


@pytest.mark.parametrize(("c", "backend", "cached", "per_head"), CASES,
                         ids=lambda v: str(v) if not isinstance(v, bool) else None)
def test_token_in_box_k_is_unaffected_by_other_conditions(c: int, backend: str, cached: bool, per_head: bool) -> None:
    boxes = BOXES[:c]
    cand = box_candidates(boxes, GRID)[None].expand(B, -1, -1)
    only = token_labels_from_boxes(boxes, GRID)  # the subject of tokens in exactly one box, else -1
    qkv = _qkv(c)
    base = _layer_noise_out(c, backend, cached, per_head, qkv, cand)
    for j in range(c):
        moved = _layer_noise_out(c, backend, cached, per_head, _perturb(qkv, c, [j]), cand)
        same = (moved == base).all(dim=-1).all(dim=1).all(dim=0)  # per NOISE token, every sample and head
        for k in range(c):
            if k != j:
                assert same[only == k].all(), f"a token in box {k} moved when condition {j} changed"
        assert not same[only == j].any(), f"tokens in box {j} must read condition {j}"
        if c == 1:  # a lone boxed subject is read only inside its box
            assert same[only == -1].all()


@pytest.mark.parametrize("backend", ["reference", "fast", "flex"])
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_outside_tokens_follow_s_star_or_read_nothing(backend: str, cached: bool, per_head: bool) -> None:
    c = 4
    boxes = BOXES
    outside = ~token_box_membership(boxes, GRID).any(dim=1)
    several = token_box_membership(boxes, GRID).sum(dim=1) >= 2
    assert outside.sum() == 3 and several.sum() == 3
    qkv = _qkv(c, seed=5)
    free_rec: list[RouteRecord] = []
    boxed_rec: list[RouteRecord] = []
    free = _layer_noise_out(c, backend, cached, per_head, qkv, None, free_rec)
    cand = box_candidates(boxes, GRID)[None].expand(B, -1, -1)
    boxed = _layer_noise_out(c, backend, cached, per_head, qkv, cand, boxed_rec)
    # Outside every box (outside="all"): exactly S*'s routes, and the same output as without boxes.
    assert torch.equal(boxed_rec[0].routes[..., outside], free_rec[0].routes[..., outside])
    assert torch.allclose(boxed[:, :, outside], free[:, :, outside], atol=1e-6, rtol=0)
    # In several boxes: S*'s best among those subjects only.
    r, aff = boxed_rec[0].routes, boxed_rec[0].affinity
    assert torch.equal(r, routes_from_affinity(aff, cand))
    member = token_box_membership(boxes, GRID)
    for i in several.nonzero().flatten().tolist():
        assert member[i, r[..., i].flatten()].all()
    # outside="none": those tokens read no condition, so no condition can move them.
    cand_none = box_candidates(boxes, GRID, "none")[None].expand(B, -1, -1)
    none_rec: list[RouteRecord] = []
    base = _layer_noise_out(c, backend, cached, per_head, qkv, cand_none, none_rec)
    assert (none_rec[0].routes[..., outside] == c).all()
    moved = _layer_noise_out(c, backend, cached, per_head, _perturb(qkv, c, list(range(c))), cand_none)
    assert torch.equal(moved[:, :, outside], base[:, :, outside])
    assert not torch.equal(moved[:, :, ~outside], base[:, :, ~outside])
