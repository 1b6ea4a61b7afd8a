"""The toy measurement scripts' own logic: bench/toy_failures.py tallies wrong body colours from a
report's verdict lines; bench/toy_slots.py reverses a case's caption without changing its picture."""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tally() -> Callable[[list[str]], tuple[Counter, Counter, Counter, Counter]]:
    return _script("toy_failures").tally


def test_wrong_colours_are_counted_per_prompted_colour_and_borrowing_is_told_apart() -> None:
    image = "\n".join([
        "background: gray (as prompted)",
        "a blue diamond: saw a purple diamond in the top left; fidelity 0.75",
        "a red cross with green dots: saw a red cross with green dots in the top right; fidelity 1.00",
        "a yellow star: saw a green star at the bottom; fidelity 0.75",
    ])
    total, wrong, pairs, borrowed = _tally()([image, image])
    assert total == {"blue": 2, "red": 2, "yellow": 2}
    assert wrong == {"blue": 2, "yellow": 2}
    assert pairs == {("blue", "purple"): 2, ("yellow", "green"): 2}
    # green is the red cross's pattern colour: borrowed; purple is nobody's
    assert borrowed == {"not borrowed": 2, "borrowed from another subject": 2}


def test_a_reversed_caption_lists_the_subjects_backwards_over_the_same_picture() -> None:
    from musar.toy.cases import make_cases
    from musar.toy.world import render_scene

    case = make_cases(2, subjects=4)[1]
    flipped = _script("toy_slots").reversed_caption(case)
    assert np.array_equal(np.asarray(render_scene(flipped.scene)), np.asarray(render_scene(case.scene)))
    assert flipped.identities == case.identities[::-1]
    assert [p.region for p in flipped.scene.placements] == [p.region for p in case.scene.placements][::-1]
    first = flipped.prompt.split(",")[0]
    assert case.scene.placements[-1].region in first and flipped.prompt != case.prompt
