"""Single-subject samples, diptychs, the "another " rule, and tensor batches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from musar.data.batches import Batch, BatchTransform, BucketBatcher, collate, to_pil, to_tensor
from musar.data.samples import (
    DiptychSampler,
    Sample,
    another_phrase,
    diptych_prompt,
    make_diptych,
    single_samples,
)
from musar.data.subjects200k import BadRowWarning, SubjectPair, Subjects200K
from musar.utils.spans import find_phrase_chars

import data_fixtures as fx

# The fixture's corrupt row is hit on purpose; its warning is tested in test_data_subjects200k.
pytestmark = pytest.mark.filterwarnings("ignore::musar.data.subjects200k.BadRowWarning")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Subjects200K:
    root = tmp_path_factory.mktemp("samples")
    path = fx.write_subjects(root / "train.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadRowWarning)
        return Subjects200K.open(str(path), cache_dir=str(root / "cache"))


@pytest.fixture(scope="module")
def sampler(source: Subjects200K) -> DiptychSampler:
    return DiptychSampler(source)


def test_single_samples_both_orders(source: Subjects200K) -> None:
    pair = source.pair(0)
    assert pair is not None
    s0, s1 = single_samples(pair)
    assert s0.target is pair.views[0] and s0.references == [pair.views[1]]
    assert s1.target is pair.views[1] and s1.references == [pair.views[0]]
    assert (s0.prompt, s1.prompt) == pair.descriptions
    assert s0.phrases == s1.phrases == [pair.item]
    assert s0.num_conditions == 1


def test_phrase_always_in_single_prompt() -> None:
    views = (Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4)))
    pair = SubjectPair(
        0, "Eames chair", "furniture", ("An eames  chair by a window.", "A lounge seat."), views
    )
    s0, s1 = single_samples(pair)
    assert s0.prompt == "An eames  chair by a window." and not s0.meta["phrase_prefixed"]
    assert s1.prompt == "Eames chair. A lounge seat." and s1.meta["phrase_prefixed"]
    d = make_diptych(s1, s0, same_category=True)  # raw captions, no double prefix
    assert d.prompt == diptych_prompt(
        "Eames chair", "A lounge seat.", "another Eames chair", "An eames  chair by a window."
    )
    assert find_phrase_chars(d.prompt, d.phrases)


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("a dog", "another dog"),
        ("an espresso cup", "another espresso cup"),
        ("The poodle", "another poodle"),
        ("corgi", "another corgi"),
        ("apple pie", "another apple pie"),  # "a" must be a whole word
        ("another dog", "another dog"),
        ("  a  red mug ", "another red mug"),
    ],
)
def test_another_phrase(phrase: str, expected: str) -> None:
    assert another_phrase(phrase) == expected


def test_diptych_template_and_pixels() -> None:
    left = Sample(
        "a dog on grass.", Image.new("RGB", (4, 4), (255, 0, 0)), [Image.new("RGB", (3, 3))], ["a dog"]
    )
    right = Sample(
        "a cat indoors", Image.new("RGB", (4, 4), (0, 0, 255)), [Image.new("RGB", (3, 3))], ["a cat"]
    )
    d = make_diptych(left, right, same_category=False)
    assert d.prompt == (
        "Two images concatenated side by side, the left part is: a dog. a dog on grass, "
        "the right part is: a cat. a cat indoors"
    )
    assert d.phrases == ["a dog", "a cat"] and d.num_conditions == 2
    assert d.references == [left.references[0], right.references[0]]
    assert d.target.size == (8, 4)
    assert d.target.getpixel((3, 0)) == (255, 0, 0) and d.target.getpixel((4, 0)) == (0, 0, 255)
    same = make_diptych(left, right, same_category=True)
    assert same.phrases == ["a dog", "another cat"]
    assert same.prompt == diptych_prompt("a dog", "a dog on grass", "another cat", "a cat indoors")
    assert all(p in same.prompt for p in same.phrases)


def test_another_only_for_same_category(sampler: DiptychSampler) -> None:
    seen_same = seen_diff = 0
    for i in range(150):
        d = sampler.random_pair(np.random.default_rng(i))
        same = d.meta["left"]["category"] == d.meta["right"]["category"]
        assert d.meta["same_category"] == same
        assert d.phrases[0] == d.meta["left"]["item"]
        assert d.phrases[1] == (another_phrase(d.meta["right"]["item"]) if same else d.meta["right"]["item"])
        assert d.meta["left"]["row_id"] != d.meta["right"]["row_id"]
        seen_same += same
        seen_diff += not same
    assert seen_same and seen_diff  # random pairing hits both cases on this fixture


def test_same_category_pairs_and_random_order(sampler: DiptychSampler) -> None:
    left_rows: set[tuple[int, int]] = set()
    for i in range(60):
        d = sampler.same_category_pair(np.random.default_rng(i))
        assert d.meta["left"]["category"] == d.meta["right"]["category"] != "vase"  # vase has one row
        assert d.phrases[1].startswith("another ") and not d.phrases[0].startswith("another ")
        left_rows.add((d.meta["left"]["row_id"], d.meta["right"]["row_id"]))
    assert any((b, a) in left_rows for a, b in left_rows)  # both left/right orders occur


def test_sampler_skips_corrupt_rows_deterministically(sampler: DiptychSampler) -> None:
    rows = [sampler.single(np.random.default_rng(i)).meta["row_id"] for i in range(80)]
    assert fx.CORRUPT_ROW not in rows
    assert rows == [sampler.single(np.random.default_rng(i)).meta["row_id"] for i in range(80)]


def test_tensors_in_vae_range_and_sizes(sampler: DiptychSampler) -> None:
    img = Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8))
    t = to_tensor(img)
    assert t.shape == (3, 1, 1) and t[0, 0, 0] == -1 and t[1, 0, 0] == 1
    assert to_pil(t).getpixel((0, 0)) == (0, 255, 128)
    tf = BatchTransform(view_size=32, condition_size=16)
    single = tf(sampler.single(np.random.default_rng(0)))
    dip = tf(sampler.random_pair(np.random.default_rng(0)))
    assert single.target.shape == (3, 32, 32) and single.references.shape == (1, 3, 16, 16)
    assert dip.target.shape == (3, 32, 64) and dip.references.shape == (2, 3, 16, 16)
    assert float(dip.target.min()) >= -1 and float(dip.target.max()) <= 1
    assert BatchTransform(target_size=(40, 24))(sampler.single(np.random.default_rng(0))).target.shape == (
        3,
        24,
        40,
    )


def test_collate_and_buckets(sampler: DiptychSampler) -> None:
    tf = BatchTransform(view_size=16, condition_size=8)
    rng = np.random.default_rng(0)
    mixed = [sampler.single(rng) if i % 3 else sampler.random_pair(rng) for i in range(9)]
    with pytest.raises(ValueError, match="BucketBatcher"):
        collate(mixed, tf)
    batches = list(BucketBatcher(mixed, 2, transform=tf))
    assert all(isinstance(b, Batch) for b in batches)
    assert sorted((b.num_conditions, len(b)) for b in batches) == [(1, 2), (1, 2), (1, 2), (2, 1), (2, 2)]
    for b in batches:
        c = b.num_conditions
        assert b.references.shape[1:] == (c, 3, 8, 8) and b.target.shape[2:] == (16, 16 * c)
        assert len(b.prompts) == len(b.phrases) == len(b) and all(len(p) == c for p in b.phrases)
    assert [len(b) for b in BucketBatcher(mixed, 2, transform=tf, drop_last=True)] == [2, 2, 2, 2]
    moved = batches[0].to("cpu", torch.float16)
    assert moved.target.dtype == torch.float16 and moved.prompts == batches[0].prompts


def test_sample_to_json() -> None:
    # What samples.jsonl records: everything but the pixels.
    s = Sample("p", Image.new("RGB", (4, 2)), [Image.new("RGB", (2, 2))], ["x"], {"kind": "single"})
    assert s.to_json() == {
        "prompt": "p",
        "phrases": ["x"],
        "num_conditions": 1,
        "target_size": [4, 2],
        "reference_sizes": [[2, 2]],
        "meta": {"kind": "single"},
    }
