"""DreamBench reader on the shared copy (original google/dreambooth layout)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from musar.data.dreambench import (
    LIVE_CLASSES,
    find_dreambench_root,
    format_prompt,
    load_dreambench,
    parse_prompts_and_classes,
)
from musar.errors import MusarError

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"
needs_dreambench = pytest.mark.skipif(
    not (DREAMBENCH / "prompts_and_classes.txt").is_file(),
    reason=f"DreamBench copy not found at {DREAMBENCH} (clone google/dreambooth's dataset/ folder there)",
)


@needs_dreambench
def test_counts_on_shared_copy() -> None:
    bench = load_dreambench(DREAMBENCH)
    assert len(bench.subjects) == 30
    assert bench.num_images == 158
    assert len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25
    for s in bench.subjects:
        assert len(bench.prompts_for(s)) == 25
        assert s.condition_image.name == "00.jpg"
        assert s.live == (s.class_name in LIVE_CLASSES)
    live = [s.name for s in bench.subjects if s.live]
    assert len(live) == 9 and {"dog", "dog8", "cat", "cat2"} <= set(live)
    assert bench.subject("bear_plushie").class_name == "stuffed animal"


@needs_dreambench
def test_prompt_lists_come_from_the_file() -> None:
    bench = load_dreambench(DREAMBENCH)
    dog, can = bench.subject("dog"), bench.subject("can")
    assert bench.prompts_for(dog)[0] == "a dog in the jungle"
    assert "a dog wearing a santa hat" in bench.prompts_for(dog)
    assert "a can floating in an ocean of milk" in bench.prompts_for(can)
    assert not any("santa" in p for p in bench.prompts_for(can))
    assert bench.prompts_for(dog, unique_token="sks")[0] == "a sks dog in the jungle"


@needs_dreambench
def test_repository_layout_with_dataset_subfolder(tmp_path: Path) -> None:
    repo = tmp_path / "dreambooth"
    (repo / "dataset").mkdir(parents=True)
    shutil.copy(DREAMBENCH / "prompts_and_classes.txt", repo / "dataset")
    for sub in DREAMBENCH.iterdir():
        if sub.is_dir():  # links keep the test fast and the copy small
            (repo / "dataset" / sub.name).symlink_to(sub, target_is_directory=True)
    assert find_dreambench_root(repo) == repo / "dataset"
    assert load_dreambench(repo).num_images == 158


def test_parse_minimal_text() -> None:
    text = (
        "Classes\n\nsubject_name,class\nmug,cup\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} on a table'.format(unique_token, class_token),\n]\n\n"
        "Live Subject Prompts\n\nprompt_list = [\n'a {0} {1} running'.format(unique_token, class_token)\n]\n"
    )
    classes, objects, live = parse_prompts_and_classes(text)
    assert classes == {"mug": "cup"}
    assert objects == ["a {0} {1} on a table"] and live == ["a {0} {1} running"]
    assert format_prompt(objects[0], "cup") == "a cup on a table"


def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(MusarError, match="not found"):
        load_dreambench(tmp_path / "nope")
    with pytest.raises(MusarError, match="not a DreamBench folder"):
        load_dreambench(tmp_path)
    (tmp_path / "prompts_and_classes.txt").write_text("Classes\nsubject_name,class\n")
    with pytest.raises(MusarError, match="no 'subject_name,class' table"):
        load_dreambench(tmp_path)
    (tmp_path / "prompts_and_classes.txt").write_text(
        "Classes\nsubject_name,class\nmug,cup\nObject Prompts\n'a {0} {1}'.format(u, c)\n"
        "Live Subject Prompts\n'a {0} {1}'.format(u, c)\n"
    )
    with pytest.raises(MusarError, match="'mug' is listed"):
        load_dreambench(tmp_path)
