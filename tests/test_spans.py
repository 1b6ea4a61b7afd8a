"""Subject spans from fast-tokenizer offsets (docs/design.md sec. 4)."""

from __future__ import annotations

import re

import pytest

from musar.errors import MusarError
from musar.utils.spans import find_phrase_chars, find_subject_spans, spans_tensor
from musar.utils.tokenizer import train_unigram_tokenizer, word_level_tokenizer

CORPUS = [
    "a photo of a dog and another dog on the beach",
    "a red backpack and a corgi, in the snow!",
    "two cats and a teapot on a wooden floor",
] * 5


@pytest.fixture(scope="module", params=["word", "unigram"])
def tokenizer(request: pytest.FixtureRequest):
    if request.param == "word":
        return word_level_tokenizer(re.findall(r"\w+|[^\w\s]", " ".join(CORPUS)), model_max_length=32)
    return train_unigram_tokenizer(CORPUS, vocab_size=80, model_max_length=32)


def _decoded(tokenizer, prompt: str, span: tuple[int, int]) -> str:
    ids = tokenizer(prompt, max_length=32, truncation=True)["input_ids"]
    return tokenizer.decode(ids[span[0] : span[0] + span[1]]).replace(" ", "").lower()


def test_spans_cover_exactly_the_phrase(tokenizer) -> None:
    prompt = "A Red   Backpack and a corgi, in the snow!"
    spans = find_subject_spans(prompt, ["a red backpack", "corgi"], tokenizer, max_length=32)
    assert _decoded(tokenizer, prompt, spans[0]) == "aredbackpack"
    assert _decoded(tokenizer, prompt, spans[1]) == "corgi"
    assert spans[0][0] + spans[0][1] <= spans[1][0]


def test_repeated_phrases_match_in_order(tokenizer) -> None:
    prompt = "a photo of a dog and another dog on the beach"
    first, second = find_subject_spans(prompt, ["dog", "dog"], tokenizer, max_length=32)
    assert first[0] < second[0]
    assert _decoded(tokenizer, prompt, first) == _decoded(tokenizer, prompt, second) == "dog"
    a, b = find_subject_spans(prompt, ["a dog", "another dog"], tokenizer, max_length=32)
    assert _decoded(tokenizer, prompt, a) == "adog" and _decoded(tokenizer, prompt, b) == "anotherdog"


def test_whole_words_and_punctuation() -> None:
    assert find_phrase_chars("a catalog and a cat.", ["cat"]) == [(16, 19)]
    assert find_phrase_chars("hello, (red dog)!", ["red dog"]) == [(8, 15)]


def test_missing_and_overlapping_phrases_are_user_errors(tokenizer) -> None:
    with pytest.raises(MusarError, match="'a cat' does not appear"):
        find_subject_spans("a dog on the beach", ["a cat"], tokenizer, max_length=32)
    with pytest.raises(MusarError, match="overlaps"):
        find_subject_spans("a red dog on the beach", ["a red dog", "red dog"], tokenizer, max_length=32)
    with pytest.raises(MusarError, match="empty"):
        find_subject_spans("a dog", ["  "], tokenizer, max_length=32)


def test_phrase_beyond_truncation(tokenizer) -> None:
    prompt = "a dog " * 20 + "and a teapot"
    with pytest.raises(MusarError, match="beyond"):
        find_subject_spans(prompt, ["teapot"], tokenizer, max_length=8)


def test_spans_tensor_shapes() -> None:
    t = spans_tensor([[(1, 2), (4, 1)], [(0, 1), (3, 3)]])
    assert t.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="same number"):
        spans_tensor([[(1, 2)], [(0, 1), (3, 3)]])
