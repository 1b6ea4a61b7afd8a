"""The toy probes' machinery on constructed inputs: the affinity tap, the grounding term, the pools."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from musar.toy.cases import layout_boxes, make_cases
from musar.toy.grounding import GroundingTargets, caption_phrases, grounding_loss
from musar.toy.metrics import routing_accuracy, scene_token_labels
from musar.toy.model import build_toy_pipeline
from musar.toy.pools import SAME, diptych_pool, scene_pool
from musar.toy.sampling import AffinityTap, sample_text_only, tapped
from musar.toy.world import SHAPES, caption
from musar.utils.spans import find_subject_spans


@pytest.fixture(scope="module")
def pipe():  # type: ignore[no-untyped-def]
    p = build_toy_pipeline(seed=3)
    # A random toy base starts with zero modulation (adaLN-Zero): give it some so attention varies.
    with torch.no_grad():
        for prm in p.transformer.parameters():
            if (prm == 0).all():
                prm.normal_(0, 0.02)
    return p


def test_grounding_loss_is_zero_when_tokens_attend_to_their_subject() -> None:
    labels = torch.tensor([[0, 0, 1, -1]])
    targets = GroundingTargets(torch.zeros(1, 2, 2, dtype=torch.long), labels, torch.tensor([True]))
    perfect = torch.tensor([[[1.0, 0.0], [0.9, 0.0], [0.0, 0.5], [0.3, 0.3]]])
    uniform = torch.full((1, 4, 2), 0.2)
    assert float(grounding_loss([perfect], targets)) < 1e-6
    assert float(grounding_loss([uniform, uniform], targets)) == pytest.approx(math.log(2), rel=1e-5)
    wrong = torch.tensor([[[0.1, 0.9], [0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]])
    assert float(grounding_loss([wrong], targets)) == pytest.approx(-math.log(0.1), rel=1e-5)
    off = GroundingTargets(targets.spans, labels, torch.tensor([False]))
    assert grounding_loss([wrong], off) is None


def test_scene_pool_targets_point_at_the_caption_phrases(pipe) -> None:  # type: ignore[no-untyped-def]
    pool = scene_pool(40, seed=2, tokenizer=pipe.tokenizer_2, max_length=64, brief_prob=0.5, same_category_prob=1.0)
    two = pool.targets.valid.nonzero().flatten().tolist()
    assert two and len(two) < 40  # one- and two-subject scenes, only the latter take part
    words = [pipe.tokenizer_2.convert_ids_to_tokens(pipe.tokenizer_2(p).input_ids) for p in pool.prompts]
    for i in two:
        (s0, l0), (s1, l1) = pool.targets.spans[i].tolist()
        first, second = words[i][s0 : s0 + l0], words[i][s1 : s1 + l1]
        assert set(first) & set(second) & set(SHAPES)  # same_category_prob=1: one shape word in both
        assert s0 + l0 <= s1 and (second[0] == "another" or len(second) > 1)
        labels = pool.targets.labels[i]
        assert (labels == 0).sum() >= 4 and (labels == 1).sum() >= 4


def test_caption_phrases_follow_the_caption_rule() -> None:
    case = make_cases(1)[0]  # a same-shape pair
    assert caption_phrases(case.scene, [True, True]) == list(case.phrases)
    assert case.phrases[1] == f"another {case.identities[1].shape}"
    full = caption_phrases(case.scene, [False, False])
    assert all(p in caption(case.scene) for p in full)


def test_diptych_pool_has_same_identity_panels_named_the_same(pipe) -> None:  # type: ignore[no-untyped-def]
    pool = diptych_pool(24, seed=0, tokenizer=pipe.tokenizer_2, max_length=64, brief_prob=1.0, same_identity_prob=0.5)
    assert pool.pixels.shape == (24, 3, 64, 128)
    same = [i for i, p in enumerate(pool.prompts) if f"is: {SAME} " in p]
    assert 0 < len(same) < 24
    for i in same:
        left, right = pool.pixels[i, :, :, :64], pool.pixels[i, :, :, 64:]
        # One identity: the two panels use the same set of object colours (backgrounds aside).
        colours = [set(map(tuple, x.reshape(3, -1).T.tolist())) for x in (left, right)]
        assert len(colours[0] & colours[1]) >= 1
    labels = pool.targets.labels.reshape(24, 8, 16)
    assert (labels[:, :, :8] != 1).all() and (labels[:, :, 8:] != 0).all()
    spans = pool.targets.spans
    assert (spans[:, 0, 0] + spans[:, 0, 1] <= spans[:, 1, 0]).all()


def test_tap_changes_nothing_and_sees_every_layer_and_step(pipe) -> None:  # type: ignore[no-untyped-def]
    case = make_cases(2)[1]
    spans = torch.tensor([find_subject_spans(case.prompt, case.phrases, pipe.tokenizer_2, 64)])
    plain = sample_text_only(pipe, [case.prompt], [5], steps=3)
    tap = AffinityTap()
    with tapped(pipe.transformer, tap):
        seen = sample_text_only(pipe, [case.prompt], [5], steps=3, tap=tap, spans=spans)
    assert np.array_equal(np.asarray(plain[0]), np.asarray(seen[0]))
    routes = tap.all_routes()
    assert routes.shape == (3, 4, 1, 64) and set(np.unique(routes)) <= {0, 1}
    assert type(pipe.transformer.transformer_blocks[0].attn.processor).__name__ == "MusarAttnProcessor"


@pytest.mark.parametrize("given", [False, True], ids=["s_star", "layout_boxes"])
def test_tap_routes_equal_what_dynamic_routing_routes(pipe, monkeypatch, given: bool) -> None:  # type: ignore[no-untyped-def]
    import musar.pipelines.pipeline_musar

    class PerLayer(list):  # keeps every RouteRecord instead of the layer mean
        def __call__(self, record: object) -> None:
            self.append(record)

    monkeypatch.setattr(musar.pipelines.pipeline_musar, "RoutingRecorder", PerLayer)
    case = make_cases(2)[0]
    boxes = layout_boxes(case) if given else None
    tap = AffinityTap()
    with tapped(pipe.transformer, tap):
        out = pipe(case.prompt, list(zip(case.reference_images(), case.phrases, strict=True)), height=64, width=64,
                   num_inference_steps=2, condition_size=64, phrase_tokens=8, max_sequence_length=64,
                   generator=torch.Generator().manual_seed(0), attention="fast", progress=False, return_routing=True,
                   boxes=boxes)
        tap.flush()
    theirs = np.zeros((2, 4, 1, 64), dtype=np.int64)
    for record in out.routing:
        theirs[record.step, record.layer] = record.routes.numpy()
    ours = tap.all_routes()
    assert ours.shape == theirs.shape
    assert (ours == theirs).mean() > 0.99  # fused vs reference S*: float rounding may flip a near-tie
    if given:  # every token of a subject lies in its own box only, so it is routed to that subject
        labels = scene_token_labels(case.scene)
        assert routing_accuracy(ours, labels) == 1.0


def test_layout_boxes_cover_each_subject_and_nothing_of_the_other() -> None:
    for case in make_cases(6):
        labels = scene_token_labels(case.scene).reshape(8, 8)
        boxes = layout_boxes(case)
        assert len(boxes) == len(case.identities)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            inside = np.zeros((8, 8), bool)
            inside[round(y0 * 8):round(y1 * 8), round(x0 * 8):round(x1 * 8)] = True
            assert (labels[~inside] != k).all()  # the box holds every token of subject k
            assert not (inside & (labels >= 0) & (labels != k)).any()  # and none of another subject


def test_background_phrase_competes_for_pure_background_tokens(pipe) -> None:  # type: ignore[no-untyped-def]
    from musar.toy.grounding import background_phrase

    pool = scene_pool(30, seed=4, tokenizer=pipe.tokenizer_2, max_length=64, background=True)
    assert pool.targets.valid.all()  # with the background every scene takes part, lone subjects too
    tok = pipe.tokenizer_2
    for i in range(30):
        words = tok.convert_ids_to_tokens(tok(pool.prompts[i]).input_ids)
        start, length = pool.targets.spans[i, -1].tolist()
        assert words[start : start + length][-1] == "background"
        labels = pool.targets.labels[i]
        assert (labels == 2).sum() > 32  # most of the picture is pure background
        subjects = int(pool.targets.span_valid[i].sum()) - 1
        assert set(labels.unique().tolist()) <= {-1, 2, *range(subjects)}
    assert background_phrase(make_cases(1)[0].scene).endswith(" background")


def test_padding_slots_take_no_share_of_the_affinity() -> None:
    labels = torch.tensor([[0, 1]])
    spans = torch.zeros(1, 3, 2, dtype=torch.long)
    aff = torch.tensor([[[0.4, 0.1, 0.5], [0.1, 0.4, 0.5]]])  # slot 2 would dominate if it counted
    real = GroundingTargets(spans, labels, torch.tensor([True]), torch.tensor([[True, True, False]]))
    assert float(grounding_loss([aff], real)) == pytest.approx(-math.log(0.8), rel=1e-5)
