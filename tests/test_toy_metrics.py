"""The toy gates' measurement functions on constructed inputs (musar.toy.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from musar.toy.analyser import evaluate
from musar.toy.metrics import (
    attribute_rates,
    entanglement,
    late_steps,
    mean_se,
    routing_accuracy,
    scene_token_labels,
    token_labels,
)
from musar.toy.world import Identity, Placement, Scene, render_scene


def test_mean_se_matches_the_binomial_error() -> None:
    m, se = mean_se([1, 0, 1, 1])
    assert m == 0.75 and se == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert mean_se([float("nan"), 1.0, 0.0])[0] == 0.5
    assert all(math.isnan(x) for x in mean_se([]))
    assert mean_se([0.4])[0] == 0.4 and math.isnan(mean_se([0.4])[1])


def test_token_labels_need_half_a_token_inside_a_mask() -> None:
    a = np.zeros((16, 16), dtype=bool)
    a[0:8, 0:4] = True  # exactly half of token (0, 0)
    a[8:16, 8:11] = True  # 3/8 of token (1, 1): too little
    b = np.zeros((16, 16), dtype=bool)
    b[0:8, 8:16] = True  # all of token (0, 1)
    assert token_labels([a, b], token_px=8).tolist() == [0, 1, -1, -1]
    with pytest.raises(ValueError):
        token_labels([np.zeros((12, 16), dtype=bool)], token_px=8)


def test_scene_token_labels_follow_the_layout() -> None:
    left, right = Identity("square", "red"), Identity("square", "blue")
    scene = Scene("white", (Placement(left, "left", 0.38), Placement(right, "right", 0.38)))
    labels = scene_token_labels(scene).reshape(8, 8)
    assert (labels[:, :4] != 1).all() and (labels[:, 4:] != 0).all()
    assert (labels == 0).sum() == (labels == 1).sum() >= 4  # two 24 px squares, mirrored
    assert labels[0].tolist() == [-1] * 8  # the top row is background


def test_routing_accuracy_counts_only_labelled_tokens() -> None:
    labels = np.array([0, 0, 1, 1, -1, -1])
    assert routing_accuracy(np.array([0, 0, 1, 1, 1, 0]), labels) == 1.0
    assert routing_accuracy(np.array([1, 1, 0, 0, 0, 0]), labels) == 0.0
    assert routing_accuracy(np.array([0, 1, 1, 0, 0, 0]), labels) == 0.5
    # Leading axes (steps, layers) are pooled.
    stacked = np.stack([np.array([0, 0, 1, 1, 0, 0]), np.array([1, 1, 1, 1, 0, 0])])
    assert routing_accuracy(stacked, labels) == 0.75
    assert math.isnan(routing_accuracy(np.zeros(3, dtype=int), np.array([-1, -1, -1])))


def test_late_steps_are_the_second_half() -> None:
    assert late_steps(16) == list(range(8, 16))
    assert late_steps(5) == [2, 3, 4]


def _scene(*placed: tuple[Identity, str]) -> Scene:
    return Scene("white", tuple(Placement(i, r, 0.38) for i, r in placed))


def test_attribute_rates_and_entanglement_on_rendered_scenes() -> None:
    a = Identity("diamond", "red", "dots", "blue")
    b = Identity("diamond", "green")
    truth = _scene((a, "left"), (b, "right"))
    swapped_colour = _scene((Identity("diamond", "green", "dots", "blue"), "left"), (b, "right"))
    verdicts = [evaluate(render_scene(truth), (a, b), truth), evaluate(render_scene(swapped_colour), (a, b), truth)]
    rates = attribute_rates(verdicts)
    assert rates["shape"][0] == 1.0
    assert rates["body_colour"][0] == 0.75  # 4 subjects, one body colour wrong
    assert rates["all_present"][0] == 0.5 and rates["background"][0] == 1.0
    assert rates["pattern_colour_patterned"][0] == 1.0
    rate, se = entanglement(verdicts)
    # b differs from a in body colour, pattern and pattern colour: 3 eligible; a from b likewise.
    assert rate == pytest.approx(1 / 12) and se > 0


def test_strict_presence_refuses_clutter_and_wrong_regions() -> None:
    a, b = Identity("diamond", "red"), Identity("circle", "green")
    truth = _scene((a, "left"), (b, "right"))
    swapped = _scene((a, "right"), (b, "left"))  # both drawn, each in the other's region
    cluttered = Scene("white", (Placement(a, "top left", 0.3), Placement(b, "top right", 0.3),
                                Placement(Identity("star", "blue"), "bottom left", 0.3)))
    rates = {name: attribute_rates([evaluate(render_scene(s), (a, b), truth)])
             for name, s in (("truth", truth), ("swapped", swapped), ("cluttered", cluttered))}
    assert rates["truth"]["clean"][0] == 1.0 and rates["truth"]["all_present_strict"][0] == 1.0
    assert rates["swapped"]["all_present"][0] == 1.0 and rates["swapped"]["all_present_strict"][0] == 0.0
    assert rates["cluttered"]["all_present"][0] == 1.0  # the plain metric picks the matching objects
    assert rates["cluttered"]["clean"][0] == 0.0 and rates["cluttered"]["all_present_strict"][0] == 0.0


def test_diptych_artefact_sees_seams_and_extra_subjects() -> None:
    from musar.toy.analyser import analyse
    from musar.toy.metrics import diptych_artefact

    a, b = Identity("circle", "red"), Identity("star", "blue")
    clean = render_scene(_scene((a, "left"), (b, "right")))
    assert not diptych_artefact(clean, analyse(clean), subjects=2)
    assert diptych_artefact(clean, analyse(clean), subjects=1)  # one asked for, two drawn
    seam = np.asarray(clean).copy()
    seam[:, 32:][(seam[:, 32:] == (245, 245, 245)).all(-1)] = (128, 128, 128)  # right panel turns gray
    assert diptych_artefact(seam, analyse(seam), subjects=2)
