"""Subject spans: where each subject phrase sits among the main prompt's tokens (docs/design.md sec. 4).

Phrases are located in the prompt *string* (case-insensitive, any run of whitespace matches any
other, whole words only), then mapped to tokens through the fast tokenizer's character offsets.
Working on characters first keeps the rule independent of how a tokenizer splits words.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from musar.errors import MusarError

if TYPE_CHECKING:
    import torch


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    words = phrase.split()
    if not words:
        raise MusarError("a subject phrase is empty")
    body = r"\s+".join(re.escape(w) for w in words)
    # Whole words only: "cat" must not match inside "catalog".
    left = r"(?<!\w)" if re.match(r"\w", words[0]) else ""
    right = r"(?!\w)" if re.search(r"\w$", words[-1]) else ""
    return re.compile(left + body + right, re.IGNORECASE)


def find_phrase_chars(prompt: str, phrases: Sequence[str]) -> list[tuple[int, int]]:
    """Character ranges [start, end) of each phrase, matched in order without overlap.

    A repeated phrase takes the next free occurrence, so ("dog", "dog") in "a dog and another
    dog" maps to the first and the second "dog".
    """
    taken: list[tuple[int, int]] = []
    out: list[tuple[int, int]] = []
    for phrase in phrases:
        found = None
        for match in _phrase_pattern(phrase).finditer(prompt):
            s, e = match.span()
            if all(e <= ts or s >= te for ts, te in taken):
                found = (s, e)
                break
        if found is None:
            if _phrase_pattern(phrase).search(prompt):
                raise MusarError(f"subject phrase {phrase!r} overlaps another subject phrase in the prompt")
            raise MusarError(f"subject phrase {phrase!r} does not appear in the prompt {prompt!r}")
        taken.append(found)
        out.append(found)
    return out


def chars_to_tokens(
    char_spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Map character ranges to token ranges (start, length) via offsets; special tokens have (0, 0)."""
    out: list[tuple[int, int]] = []
    for cs, ce in char_spans:
        hits = [i for i, (ts, te) in enumerate(offsets) if te > ts and ts < ce and te > cs]
        if not hits:
            raise MusarError(
                f"subject phrase at characters {cs}:{ce} falls beyond the {len(offsets)} prompt tokens kept"
            )
        out.append((hits[0], hits[-1] - hits[0] + 1))
    return out


def check_disjoint(token_spans: Sequence[tuple[int, int]], phrases: Sequence[str]) -> None:
    order = sorted(range(len(token_spans)), key=lambda i: token_spans[i][0])
    for a, b in itertools.pairwise(order):
        if token_spans[a][0] + token_spans[a][1] > token_spans[b][0]:
            raise MusarError(f"subject phrases {phrases[a]!r} and {phrases[b]!r} share prompt tokens")


def find_subject_spans(
    prompt: str, phrases: Sequence[str], tokenizer: Any, max_length: int
) -> list[tuple[int, int]]:
    """Token spans (start, length) of each phrase in ``prompt`` as ``tokenizer`` encodes it.

    ``tokenizer`` must be a fast (Rust) tokenizer: offsets come from ``return_offsets_mapping``.
    ``max_length`` must be the length the prompt is encoded with (FLUX: 512 for dev).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("subject spans need a fast tokenizer (return_offsets_mapping)")
    char_spans = find_phrase_chars(prompt, phrases)
    enc = tokenizer(prompt, max_length=max_length, truncation=True, return_offsets_mapping=True)
    token_spans = chars_to_tokens(char_spans, [tuple(o) for o in enc["offset_mapping"]])
    check_disjoint(token_spans, phrases)
    return token_spans


def spans_tensor(batch_spans: Sequence[Sequence[tuple[int, int]]], device: torch.device | str | None = None) -> torch.Tensor:
    """(B, c, 2) long tensor from per-sample span lists (all samples must have the same c)."""
    import torch  # imported here so phrase checks stay light for the CLI

    counts = {len(s) for s in batch_spans}
    if len(counts) != 1:
        raise ValueError(f"every sample in a batch needs the same number of subjects, got {sorted(counts)}")
    return torch.tensor([list(map(list, s)) for s in batch_spans], dtype=torch.long, device=device)
