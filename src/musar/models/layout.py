"""The token layout: the one description of which token sits where in MUSAR's joint attention.

Four kinds of tokens meet in every attention call (docs/design.md sec. 2):

==============  ================================  ==================
kind            what                              stream (double)
==============  ================================  ==================
PROMPT          T5 tokens of the main prompt      text (context)
COND_TEXT k     T5 tokens of subject phrase k     text (context)
NOISE           packed noisy target latents       image
COND_IMAGE k    packed VAE latents of reference k image
==============  ================================  ==================

Order of the joint sequence (fixed; diffusers puts the text stream first)::

    [PROMPT, CT^0, ..., CT^{c-1}, NOISE, CI^0, ..., CI^{c-1}]
     \\________ text stream ______/ \\_______ image stream ______/

Keeping every condition token *after* the main tokens of its stream means each stream is just
"main rows, then condition rows": per-token modulation and branch LoRA only ever split a stream
in two, and a layout with no conditions is exactly FLUX's own sequence. Masks, LoRA row plans,
modulation and position ids are all derived from this object.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Kind(enum.IntEnum):
    PROMPT = 0
    NOISE = 1
    COND_IMAGE = 2
    COND_TEXT = 3


@dataclass(frozen=True)
class Segment:
    kind: Kind
    start: int
    stop: int
    cond: int = -1  # condition index for COND_* segments, -1 otherwise

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class TokenLayout:
    """Segment lengths of one attention sequence. Pure data; everything else is derived."""

    prompt: int
    noise: int
    cond_image: tuple[int, ...] = ()
    cond_text: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "cond_image", tuple(int(n) for n in self.cond_image))
        object.__setattr__(self, "cond_text", tuple(int(n) for n in self.cond_text))
        if len(self.cond_image) != len(self.cond_text):
            raise ValueError(
                f"every condition needs an image and a text segment: got {len(self.cond_image)} "
                f"image and {len(self.cond_text)} text segments"
            )
        if min((self.prompt, self.noise, *self.cond_image, *self.cond_text), default=0) < 0:
            raise ValueError("segment lengths must be >= 0")

    @classmethod
    def uniform(cls, prompt: int, noise: int, num_conditions: int, cond_image: int, cond_text: int) -> TokenLayout:
        return cls(prompt, noise, (cond_image,) * num_conditions, (cond_text,) * num_conditions)

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_conditions(self) -> int:
        return len(self.cond_image)

    @property
    def text_len(self) -> int:
        return self.prompt + sum(self.cond_text)

    @property
    def image_len(self) -> int:
        return self.noise + sum(self.cond_image)

    @property
    def total(self) -> int:
        return self.text_len + self.image_len

    # ---- segments --------------------------------------------------------------------------
    @property
    def segments(self) -> tuple[Segment, ...]:
        # Rebuilt on each use (a few tiny objects), not cached on the instance: a cached_property
        # takes a lock on Python 3.11, and state on the layout would have to be rebuilt by
        # torch.compile after a graph; neither traces.
        out: list[Segment] = []
        pos = 0

        def add(kind: Kind, length: int, cond: int = -1) -> None:
            nonlocal pos
            out.append(Segment(kind, pos, pos + length, cond))
            pos += length

        add(Kind.PROMPT, self.prompt)
        for k, length in enumerate(self.cond_text):
            add(Kind.COND_TEXT, length, k)
        add(Kind.NOISE, self.noise)
        for k, length in enumerate(self.cond_image):
            add(Kind.COND_IMAGE, length, k)
        return tuple(out)

    @property
    def prompt_slice(self) -> slice:
        return slice(0, self.prompt)

    @property
    def noise_slice(self) -> slice:
        return slice(self.text_len, self.text_len + self.noise)

    def cond_text_slice(self, k: int) -> slice:
        return self._find(Kind.COND_TEXT, k).slice

    def cond_image_slice(self, k: int) -> slice:
        return self._find(Kind.COND_IMAGE, k).slice

    def _find(self, kind: Kind, cond: int) -> Segment:
        for seg in self.segments:
            if seg.kind == kind and seg.cond == cond:
                return seg
        raise IndexError(f"no {kind.name} segment for condition {cond} (layout has {self.num_conditions})")

    def cond_slices(self, k: int) -> tuple[slice, slice]:
        """Both segments of condition k, text then image, in sequence order."""
        return self.cond_text_slice(k), self.cond_image_slice(k)

    # Per-stream splits: each stream is "main rows, then condition rows".
    @property
    def text_split(self) -> tuple[int, int]:
        return self.prompt, sum(self.cond_text)

    @property
    def image_split(self) -> tuple[int, int]:
        return self.noise, sum(self.cond_image)

    @property
    def joint_split(self) -> tuple[int, int, int, int]:
        """[PROMPT | all CT | NOISE | all CI] — the single-stream blocks' four row groups."""
        return (*self.text_split, *self.image_split)

    # ---- per-token descriptions (for masks and tests) --------------------------------------
    def kinds(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(L,) int64 tensor of :class:`Kind` values."""
        parts = [torch.full((s.length,), int(s.kind), dtype=torch.long) for s in self.segments]
        return torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.long, device=device)

    def cond_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(L,) int64 tensor: the condition index of COND tokens, -1 for PROMPT and NOISE."""
        parts = [torch.full((s.length,), s.cond, dtype=torch.long) for s in self.segments]
        return torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.long, device=device)
