"""What the toy world is made of, before any pixel: identities, placements, scenes and their words.

A subject's identity is shape x body colour x pattern x pattern colour; the shape is its category,
so two subjects of one shape are the hard, entanglement-prone case. A :class:`Scene` places
identities in named regions on a background; :func:`caption` says it in words. Drawing, layouts and
Subjects200K-style pairs are :mod:`musar.toy.world`'s, which re-exports every name defined here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from musar.errors import MusarError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 50, 220),
    "yellow": (240, 220, 30),
    "purple": (170, 40, 220),
    "cyan": (30, 210, 220),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
BODY_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checks")
PATTERN_COLOURS: tuple[str, ...] = ("white", "black", "red", "green", "blue", "yellow")
BACKGROUNDS: tuple[str, ...] = ("gray", "white", "black", "blue", "yellow")
TEXTURES: tuple[str, ...] = ("plain", "speckled")

# Region centres as fractions of the image side (x, y).
REGIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
SINGLE_REGIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")


@dataclass(frozen=True)
class Identity:
    """What a subject is, independent of where it is drawn. ``pattern_colour`` is None iff plain."""

    shape: str
    body_colour: str
    pattern: str = "plain"
    pattern_colour: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise MusarError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        if self.body_colour not in BODY_COLOURS:
            raise MusarError(f"unknown body colour {self.body_colour!r}; known: {', '.join(BODY_COLOURS)}")
        if self.pattern not in PATTERNS:
            raise MusarError(f"unknown pattern {self.pattern!r}; known: {', '.join(PATTERNS)}")
        if (self.pattern == "plain") != (self.pattern_colour is None):
            raise MusarError("a plain identity has no pattern colour and a patterned one needs one")
        if self.pattern_colour is not None and (
            self.pattern_colour not in PATTERN_COLOURS or self.pattern_colour == self.body_colour
        ):
            raise MusarError(f"pattern colour {self.pattern_colour!r} is unknown or equals the body colour")

    @property
    def category(self) -> str:
        return self.shape

    @property
    def key(self) -> str:
        return f"{self.shape}|{self.body_colour}|{self.pattern}|{self.pattern_colour or '-'}"

    @property
    def colours(self) -> frozenset[str]:
        return frozenset(c for c in (self.body_colour, self.pattern_colour) if c is not None)


@dataclass(frozen=True)
class Placement:
    """One subject in a scene: its region, box side (fraction of the image) and centre offset."""

    identity: Identity
    region: str
    scale: float
    dx: float = 0.0
    dy: float = 0.0

    def box(self, size: int) -> tuple[int, int, int]:
        """(x0, y0, side) in pixels, clamped to stay 2 px inside the canvas."""
        side = max(4, round(self.scale * size))
        fx, fy = REGIONS[self.region]
        x0 = round((fx + self.dx) * size - side / 2)
        y0 = round((fy + self.dy) * size - side / 2)
        lo, hi = 2, size - 2 - side
        return min(max(x0, lo), hi), min(max(y0, lo), hi), side


@dataclass(frozen=True)
class Scene:
    """A rendered picture: background colour/texture and placed subjects, at ``size`` x ``size``."""

    background: str
    placements: tuple[Placement, ...] = field(default_factory=tuple)
    size: int = 64
    texture: str = "plain"
    texture_seed: int = 0

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise MusarError(f"unknown background {self.background!r}; known: {', '.join(BACKGROUNDS)}")
        if self.texture not in TEXTURES:
            raise MusarError(f"unknown texture {self.texture!r}; known: {', '.join(TEXTURES)}")
        for p in self.placements:
            if self.background in p.identity.colours:
                raise MusarError(f"background {self.background} would hide part of {p.identity.key}")


def all_identities() -> list[Identity]:
    """Every identity of the world, in a fixed order."""
    out: list[Identity] = []
    for shape in SHAPES:
        for body in BODY_COLOURS:
            out.append(Identity(shape, body))
            for pattern in PATTERNS[1:]:
                out.extend(Identity(shape, body, pattern, pc) for pc in PATTERN_COLOURS if pc != body)
    return out


def identity_split(identity: Identity, test_fraction: float = 0.1) -> str:
    """'train' or 'test' from a stable hash of the identity, so no training run sees test subjects."""
    digest = hashlib.sha256(identity.key.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def sample_identity(rng: np.random.Generator, split: str | None = None) -> Identity:
    """A uniformly random identity; with ``split`` only from that side of :func:`identity_split`."""
    for _ in range(10_000):
        shape = SHAPES[rng.integers(len(SHAPES))]
        body = BODY_COLOURS[rng.integers(len(BODY_COLOURS))]
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
        pc = None
        if pattern != "plain":
            choices = [c for c in PATTERN_COLOURS if c != body]
            pc = choices[rng.integers(len(choices))]
        ident = Identity(shape, body, pattern, pc)
        if split is None or identity_split(ident) == split:
            return ident
    raise MusarError(f"no identity found in split {split!r}")


def subject_phrase(identity: Identity, article: bool = False, brief: bool = False) -> str:
    """'red circle with white stripes' (Subjects200K ``item`` style; ``article`` prepends 'a').

    ``brief`` names the category only ('circle'), as DreamBench prompts name only the class: the
    identity must then come from a reference image.
    """
    text = identity.shape if brief else f"{identity.body_colour} {identity.shape}"
    if identity.pattern != "plain" and not brief:
        text += f" with {identity.pattern_colour} {identity.pattern}"
    return f"a {text}" if article else text


def where(region: str) -> str:
    """The caption's words for a region: 'on the left', 'at the top', 'in the top left'."""
    return {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
    }.get(region, f"in the {region}")


def caption(scene: Scene, brief: bool | Sequence[bool] = False) -> str:
    """'a red circle with white stripes on the left and a green square at the top, on a gray background'.

    ``brief`` (one flag, or one per placement) names subjects by category only; a brief subject
    whose shape was named before becomes 'another <shape>' ('a star on the left and another star
    on the right'), the phrase rule MUSAR's diptych prompts use for same-category subjects.
    """
    flags = [brief] * len(scene.placements) if isinstance(brief, bool) else list(brief)
    if len(flags) != len(scene.placements):
        raise MusarError(f"caption: {len(flags)} brief flags for {len(scene.placements)} subjects")
    parts, seen = [], set()
    for p, short in zip(scene.placements, flags, strict=True):
        if short and p.identity.shape in seen:
            phrase = f"another {p.identity.shape}"
        else:
            phrase = subject_phrase(p.identity, article=True, brief=short)
        seen.add(p.identity.shape)
        parts.append(f"{phrase} {where(p.region)}")
    texture = "speckled " if scene.texture == "speckled" else ""
    ground = f"on a {texture}{scene.background} background"
    if not parts:
        return f"an empty scene, {ground}"
    subjects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{subjects}, {ground}"
