"""The toy world: deterministic rendering, captions, held-out identities, Subjects200K records."""

from __future__ import annotations

import numpy as np
import pytest

from musar.errors import MusarError
from musar.toy.world import (
    BACKGROUNDS,
    PALETTE,
    SHAPES,
    Identity,
    Placement,
    Scene,
    all_identities,
    caption,
    identity_split,
    make_multi_scenes,
    make_pair_specs,
    make_pairs,
    pair_padding,
    render_array,
    render_scene,
    sample_identity,
    subject_phrase,
    write_pairs_parquet,
)


def test_rendering_is_deterministic_per_seed() -> None:
    a = make_multi_scenes(12, seed=5, max_objects=3)
    b = make_multi_scenes(12, seed=5, max_objects=3)
    c = make_multi_scenes(12, seed=6, max_objects=3)
    assert a == b
    assert a != c
    for sa, sb in zip(a, b):
        assert np.array_equal(render_array(sa), render_array(sb))
        assert caption(sa) == caption(sb)
    # Record i does not depend on how many records were asked for.
    assert make_multi_scenes(4, seed=5, max_objects=3) == a[:4]
    assert make_pair_specs(3, seed=1) == make_pair_specs(6, seed=1)[:3]


def test_identity_validation_and_phrases() -> None:
    ident = Identity("circle", "red", "stripes", "white")
    assert subject_phrase(ident) == "red circle with white stripes"
    assert subject_phrase(ident, article=True) == "a red circle with white stripes"
    assert subject_phrase(Identity("star", "blue")) == "blue star"
    assert ident.category == "circle"
    for bad in (
        ("blob", "red", "plain", None),
        ("circle", "red", "stripes", None),
        ("circle", "red", "plain", "white"),
        ("circle", "red", "dots", "red"),
    ):
        with pytest.raises(MusarError):
            Identity(*bad)
    with pytest.raises(MusarError):
        Scene("white", (Placement(ident, "left", 0.4),))  # the stripes would vanish


def test_captions_name_every_subject_region_and_background() -> None:
    a = Identity("circle", "red", "stripes", "white")
    b = Identity("square", "green", "dots", "black")
    scene = Scene("blue", (Placement(a, "left", 0.35), Placement(b, "right", 0.35)))
    assert caption(scene) == (
        "a red circle with white stripes on the left and a green square with black dots on the right, "
        "on a blue background"
    )
    single = Scene("gray", (Placement(Identity("star", "yellow"), "centre", 0.4),), texture="speckled")
    assert caption(single) == "a yellow star in the centre, on a speckled gray background"


def test_brief_captions_name_categories_and_mark_repeats() -> None:
    a, b = Identity("star", "red", "stripes", "white"), Identity("star", "green")
    c = Identity("circle", "blue")
    scene = Scene("gray", (Placement(a, "left", 0.38), Placement(b, "right", 0.38)))
    assert subject_phrase(a, brief=True) == "star" and subject_phrase(a, article=True, brief=True) == "a star"
    assert caption(scene, brief=True) == "a star on the left and another star on the right, on a gray background"
    # Per-subject flags: only brief subjects lose their colours; a full name is never "another".
    assert caption(scene, [False, True]) == (
        "a red star with white stripes on the left and another star on the right, on a gray background"
    )
    assert caption(scene, [True, False]).startswith("a star on the left and a green star on the right")
    mixed = Scene("gray", (Placement(a, "left", 0.38), Placement(c, "right", 0.38)))
    assert caption(mixed, brief=True) == "a star on the left and a circle on the right, on a gray background"
    with pytest.raises(MusarError, match="brief flags"):
        caption(scene, [True])


def test_brief_pair_records_carry_no_colour_words() -> None:
    rows = make_pairs(20, seed=3, brief=True)
    colours = set(PALETTE) - set(BACKGROUNDS)  # background words may appear; subject colours may not
    for row in rows:
        d = row["description"]
        assert d["item"] == d["category"]
        for key in ("description_0", "description_1"):
            assert d["item"] in d[key] and not colours & set(d[key].split()), d[key]


def test_scenes_are_valid_and_objects_apart() -> None:
    for size in (32, 64, 128):
        for scene in make_multi_scenes(60, seed=2, max_objects=3, size=size, texture_prob=0.3):
            img = render_scene(scene)
            assert img.size == (size, size) and img.mode == "RGB"
            boxes = [p.box(size) for p in scene.placements]
            for x0, y0, side in boxes:
                assert x0 >= 2 and x0 + side <= size - 2 and y0 >= 2 and y0 + side <= size - 2
            for i, (ax, ay, aw) in enumerate(boxes):
                for bx, by, bw in boxes[i + 1 :]:
                    assert ax + aw < bx or bx + bw < ax or ay + aw < by or by + bw < ay
            for p in scene.placements:
                assert scene.background not in p.identity.colours
    sizes = [p.box(64)[2] for s in make_multi_scenes(200, seed=0) for p in s.placements]
    assert min(sizes) >= 18 and max(sizes) <= 30


def test_held_out_identities_never_reach_training_data() -> None:
    idents = all_identities()
    assert len(idents) == len(set(idents))
    test = [i for i in idents if identity_split(i) == "test"]
    assert 0.05 < len(test) / len(idents) < 0.15
    assert {i.shape for i in test} == set(SHAPES)
    assert [identity_split(i) for i in idents] == [identity_split(i) for i in idents]
    rng = np.random.default_rng(0)
    assert all(identity_split(sample_identity(rng, "test")) == "test" for _ in range(50))
    for spec in make_pair_specs(100, seed=3):
        assert identity_split(spec.identity) == "train"
    for scene in make_multi_scenes(100, seed=3, max_objects=3):
        assert all(identity_split(p.identity) == "train" for p in scene.placements)


def test_pair_records_follow_the_subjects200k_schema() -> None:
    from musar.data.samples import phrase_in_prompt
    from musar.data.schema import DESCRIPTION_KEYS, QUALITY_KEYS, SUBJECTS200K_COLUMNS
    from musar.data.subjects200k import split_views

    for size in (32, 64, 128):
        specs = make_pair_specs(5, seed=4, size=size)
        records = make_pairs(5, seed=4, size=size)
        p = pair_padding(size)
        assert p == max(1, round(8 * size / 512))
        for spec, rec in zip(specs, records):
            assert tuple(rec) == SUBJECTS200K_COLUMNS
            assert rec["image"].size == (2 * size + 4 * p, size + 2 * p)
            assert isinstance(rec["collection"], str)
            assert set(rec["quality_assessment"]) == set(QUALITY_KEYS)
            assert all(v == 5 and isinstance(v, int) for v in rec["quality_assessment"].values())
            desc = rec["description"]
            assert set(desc) == set(DESCRIPTION_KEYS) and all(isinstance(v, str) for v in desc.values())
            assert desc["category"] == spec.identity.shape
            assert desc["item"] == subject_phrase(spec.identity)
            # The real splitter recovers both views pixel-exactly, and the item is in each caption.
            for view, scene, d in zip(
                split_views(rec["image"], p), spec.scenes, (desc["description_0"], desc["description_1"])
            ):
                assert np.array_equal(np.asarray(view), render_array(scene))
                assert phrase_in_prompt(desc["item"], d)
            a, b = spec.scenes
            assert a.placements[0].identity == b.placements[0].identity == spec.identity
            assert a.background != b.background and a.placements[0].region != b.placements[0].region


def test_low_quality_rows_are_marked_and_really_differ() -> None:
    specs = make_pair_specs(80, seed=9, low_quality_frac=0.5)
    low = [s for s in specs if min(s.quality.values()) < 5]
    assert 20 < len(low) < 60
    for s in low:
        second = s.scenes[1].placements[0].identity
        assert (second != s.identity) == (s.quality["objectConsistency"] < 5)


def test_parquet_round_trip_through_the_real_reader(tmp_path) -> None:
    from musar.data.subjects200k import Subjects200K

    path = tmp_path / "toy.parquet"
    write_pairs_parquet(6, path, seed=11, size=64, low_quality_frac=0.3)
    source = Subjects200K.open(str(path), padding=pair_padding(64))
    specs = make_pair_specs(6, seed=11, low_quality_frac=0.3)
    kept = [s for s in specs if min(s.quality.values()) == 5]
    assert len(source) == len(kept) and source.report.low_quality == len(specs) - len(kept)
    for k, spec in enumerate(kept):
        pair = source.pair(k)
        assert pair is not None and pair.category == spec.identity.shape
        assert pair.item == subject_phrase(spec.identity)
        for view, scene in zip(pair.views, spec.scenes):
            assert np.array_equal(np.asarray(view), render_array(scene))


def test_multi_scenes_mix_counts_and_same_category_pairs() -> None:
    scenes = make_multi_scenes(300, seed=1, max_objects=3, same_category_prob=0.5)
    counts = {len(s.placements) for s in scenes}
    assert counts == {1, 2, 3}
    multi = [s for s in scenes if len(s.placements) > 1]
    same = [s for s in multi if len({p.identity.shape for p in s.placements}) == 1]
    assert 0.3 < len(same) / len(multi) < 0.75
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    with pytest.raises(MusarError):
        make_multi_scenes(1, seed=0, max_objects=5)
