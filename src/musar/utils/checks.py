"""Cheap argument checks shared by the pipeline, the CLI and the UI (no heavy imports here).

Thin names over :mod:`musar.utils.validation`, where every rule and range lives.
"""

from __future__ import annotations

from musar.utils.validation import COUNT, HEIGHT, MAX_SIZE, MIN_SIZE, STEPS, WIDTH

__all__ = ["MAX_SIZE", "MIN_SIZE", "check_size", "check_steps", "positive_int"]


def check_size(height: int, width: int) -> None:
    HEIGHT.check(height)
    WIDTH.check(width)


def check_steps(steps: int) -> None:
    STEPS.check(steps)


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts: an integer >= 1, else argparse's own one-line error."""
    return int(COUNT(text))

