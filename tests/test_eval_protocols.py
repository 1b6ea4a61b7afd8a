"""Evaluation protocols: sizes, pairing rule, custom JSON."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from musar.data.dreambench import load_dreambench
from musar.errors import MusarError
from musar.eval.protocols import build_cases, multi_prompt, multi_templates, pair_subjects

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"
needs_dreambench = pytest.mark.skipif(
    not (DREAMBENCH / "prompts_and_classes.txt").is_file(),
    reason=f"DreamBench copy not found at {DREAMBENCH}",
)


@needs_dreambench
def test_single_protocol() -> None:
    cases = build_cases("dreambench-single", DREAMBENCH)
    assert len(cases) == 750 and len({c.case_id for c in cases}) == 750
    first = cases[0]
    assert first.kind == "single" and first.prompt == "a backpack in the jungle"
    sub = first.subjects[0]
    assert sub.image.name == "00.jpg" and sub.phrase == "backpack" and len(sub.metric_references) == 6
    assert all(c.subjects[0].phrase in c.prompt for c in cases)
    # prompt-major order: a limit of 30 touches every subject once
    assert len({c.subjects[0].name for c in build_cases("dreambench-single", DREAMBENCH, limit=30)}) == 30


@needs_dreambench
def test_multi_protocol_and_pairing_rule() -> None:
    cases = build_cases("dreambench-multi", DREAMBENCH)
    assert len(cases) == 80
    pairs, triplets = cases[:60], cases[60:]
    assert all(len(c.subjects) == 2 for c in pairs) and all(len(c.subjects) == 3 for c in triplets)
    assert all(c.kind == "multi" for c in cases)
    bench = load_dreambench(DREAMBENCH)
    cls = {s.name: s.class_name for s in bench.subjects}
    groups = [frozenset(s.name for s in c.subjects) for c in cases]
    assert len(set(groups)) == 80
    for c in cases:
        assert len({cls[s.name] for s in c.subjects}) == len(c.subjects)  # distinct classes
        for s in c.subjects:  # each phrase occurs exactly once, so routing spans are unambiguous
            assert c.prompt.count(s.phrase) == 1, c.prompt
        assert len(c.subjects[0].metric_references) >= 4
    # balanced: every subject in exactly 4 pairs and 2 triplets
    assert set(Counter(n for c in pairs for n in c.subject_names).values()) == {4}
    assert set(Counter(n for c in triplets for n in c.subject_names).values()) == {2}
    assert cases[0].prompt == "a backpack and a cat in the jungle"
    assert triplets[0].prompt == "a backpack, a cat and a dog in the jungle"
    # deterministic, and independent of the order subjects are listed in
    again = build_cases("dreambench-multi", DREAMBENCH)
    assert [(c.case_id, c.prompt) for c in again] == [(c.case_id, c.prompt) for c in cases]
    p1, t1 = pair_subjects(bench.subjects)
    p2, t2 = pair_subjects(list(reversed(bench.subjects)))
    assert [[s.name for s in g] for g in p1 + t1] == [[s.name for s in g] for g in p2 + t2]


@needs_dreambench
def test_multi_templates_are_context_only() -> None:
    templates = multi_templates(load_dreambench(DREAMBENCH))
    assert len(templates) == 10
    assert all(t.startswith("a {0} {1} ") for t in templates)
    assert multi_prompt(templates[2], ["dog", "can", "toy"]) == "a dog, a can and a toy on the beach"


def _image(path: Path) -> str:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path.name


def test_custom_cases(tmp_path: Path) -> None:
    dog, bag = _image(tmp_path / "dog.png"), _image(tmp_path / "bag.png")
    spec = [
        {
            "prompt": "a corgi next to a red backpack",
            "subjects": [{"image": dog, "phrase": "a corgi"}, {"image": bag, "phrase": "a red backpack"}],
        },
        {
            "id": "solo",
            "prompt": "A Corgi on the moon",
            "subjects": [{"image": dog, "phrase": "a corgi", "references": [dog, bag]}],
        },
    ]
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(spec))
    cases = build_cases("custom", path)
    assert [c.case_id for c in cases] == ["custom000", "solo"]
    assert cases[0].kind == "multi" and cases[1].kind == "single"
    assert cases[0].subjects[1].image == (tmp_path / "bag.png").resolve()
    assert cases[0].subjects[0].metric_references == ((tmp_path / "dog.png").resolve(),)
    assert len(cases[1].subjects[0].metric_references) == 2
    assert len(build_cases("custom", path, limit=1)) == 1
    with pytest.raises(MusarError, match="at least 1"):
        build_cases("custom", path, limit=0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read custom cases"),
        ('{"prompt": "x"}', "non-empty JSON list"),
        ('[{"prompt": "a dog", "subjects": []}]', "'subjects' must be a non-empty list"),
        ('[{"prompt": "a dog", "subjects": [{"image": "dog.png"}]}]', "expected"),
        ('[{"prompt": "a dog", "subjects": [{"image": "missing.png", "phrase": "dog"}]}]', "image not found"),
        ('[{"prompt": "a cat", "subjects": [{"image": "dog.png", "phrase": "dog"}]}]', "does not occur"),
        ('[{"id": "../x", "prompt": "a dog", "subjects": [{"image": "dog.png", "phrase": "dog"}]}]', "id"),
    ],
)
def test_bad_custom_json(tmp_path: Path, content: str, message: str) -> None:
    _image(tmp_path / "dog.png")
    path = tmp_path / "cases.json"
    path.write_text(content)
    with pytest.raises(MusarError, match=message):
        build_cases("custom", path)


def test_bad_protocol_and_limit(tmp_path: Path) -> None:
    with pytest.raises(MusarError, match="unknown protocol"):
        build_cases("coco", tmp_path)
    with pytest.raises(MusarError, match="not found"):
        build_cases("custom", tmp_path / "none.json")
    with pytest.raises(MusarError, match="DreamBench folder not found"):
        build_cases("dreambench-single", tmp_path / "none")
