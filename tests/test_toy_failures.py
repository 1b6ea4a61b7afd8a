"""bench/toy_failures.py tallies wrong body colours from a report's verdict lines."""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "toy_failures.py"


def _tally() -> Callable[[list[str]], tuple[Counter, Counter, Counter, Counter]]:
    spec = importlib.util.spec_from_file_location("toy_failures", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tally


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
