"""Cheap argument checks shared by the pipeline, the CLI and the UI (no heavy imports here)."""

from __future__ import annotations

from musar.errors import MusarError

MIN_SIZE, MAX_SIZE = 64, 4096


def check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if v % 16 != 0:
            raise MusarError(f"{name} must be a multiple of 16, got {v}")
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise MusarError(f"{name} must be between {MIN_SIZE} and {MAX_SIZE}, got {v}")


def check_steps(steps: int) -> None:
    if steps < 1:
        raise MusarError(f"steps must be >= 1, got {steps}")


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts: an integer >= 1, else argparse's own one-line error."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
