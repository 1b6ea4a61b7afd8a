"""User-facing errors.

Anything the user can fix (a bad path, a phrase missing from the prompt, a LoRA file for another
model) raises :class:`MusarError` with one line naming the problem. The CLI prints that line and
exits with code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MusarError(ValueError):
    """A problem with the user's input, reported as one readable line."""
