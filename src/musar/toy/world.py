"""The toy world: procedurally rendered subjects, scenes and captions (issue 8, item 1).

Identities, scenes and captions are defined in :mod:`musar.toy.identities` and re-exported here;
this module lays scenes out, draws them and writes Subjects200K-style pairs. Everything is drawn
without anti-aliasing from a small palette whose colours sit far apart in RGB, so
:mod:`musar.toy.analyser` can read every parameter back exactly, and a tiny diffusion model at
64x64 can still see them.

Rendering rules that the analyser relies on:

* each object fills a square box (side ``scale * size``) and keeps a rim of body colour
  (``rim_width(size)`` px) around its pattern, so the body colour always dominates the outline;
* patterns are anchored at the object's centre (a dot, a stripe or a check always sits there),
  with a unit of ``pattern_unit(size)`` px (6 px at 64x64);
* the background never has the colour of an object's body or pattern.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from musar.errors import MusarError
from musar.toy.identities import (  # noqa: F401  (re-exported: callers import the world's names from here)
    BACKGROUNDS,
    BODY_COLOURS,
    PALETTE,
    PATTERN_COLOURS,
    PATTERNS,
    REGIONS,
    SHAPES,
    SINGLE_REGIONS,
    TEXTURES,
    Identity,
    Placement,
    Scene,
    all_identities,
    caption,
    identity_split,
    sample_identity,
    subject_phrase,
    where,
)

COLLECTION = "toy_world"  # the ``collection`` value of every toy Subjects200K row
LAYOUTS: dict[int, tuple[tuple[str, ...], ...]] = {
    1: tuple((r,) for r in SINGLE_REGIONS),
    2: (("left", "right"), ("top", "bottom"), ("top left", "bottom right"), ("top right", "bottom left")),
    3: (("top left", "top right", "bottom"), ("top", "bottom left", "bottom right")),
    4: (("top left", "top right", "bottom left", "bottom right"),),
}
# Object side as a fraction of the image side, by number of objects: 27 px alone at 64x64, 24 px
# for two to four. One size per count and no jitter: a first base model, trained on sizes drawn from
# ranges and jittered centres, had not learned to draw clean subjects after 17 CPU minutes. A world
# with one geometry per (region, count) is learnable in that time. Identity, not geometry, is what
# MUSAR is measured on. Three and four subjects keep the 24 px of two (issue 21): four in the
# quadrants leave 8 px between boxes at 64 px, and a 6 px pattern unit stays readable, where the
# earlier 19 px three-subject objects held barely three pattern units across.
SCALE_RANGE: dict[int, tuple[float, float]] = {1: (0.42, 0.42), 2: (0.38, 0.38), 3: (0.38, 0.38), 4: (0.38, 0.38)}
JITTER = 0.0  # max centre offset, fraction of the side
MIN_GAP = 4 / 64  # objects stay this far apart (fraction of the side) so even blurred ones separate


def rim_width(size: int) -> int:
    return max(1, round(size / 64))


def pattern_unit(size: int) -> int:
    # 6 px at 64x64: 4 px checks and dots were the detail the toy models learned last.
    return max(2, round(6 * size / 64))


def shape_mask(shape: str, size: int, x0: int, y0: int, w: int, h: int | None = None) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` filling the box at (x0, y0) of w x h pixels."""
    h = w if h is None else h
    img = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(img)
    x1, y1 = x0 + w - 1, y0 + h - 1
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=1, outline=1)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=1, outline=1)
    elif shape == "triangle":
        draw.polygon([(mx, y0), (x1, y1), (x0, y1)], fill=1, outline=1)
    elif shape == "diamond":
        draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=1, outline=1)
    elif shape == "star":
        # A fat five-pointed star (inner radius 0.5) so patterns stay visible in its arms,
        # stretched to fill the box like every other shape.
        pts = [
            (
                (1.0 if i % 2 == 0 else 0.5) * math.sin(i * math.pi / 5),
                -(1.0 if i % 2 == 0 else 0.5) * math.cos(i * math.pi / 5),
            )
            for i in range(10)
        ]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        sx, sy = (x1 - x0) / (max(xs) - min(xs)), (y1 - y0) / (max(ys) - min(ys))
        draw.polygon(
            [(x0 + (px - min(xs)) * sx, y0 + (py - min(ys)) * sy) for px, py in pts], fill=1, outline=1
        )
    elif shape == "cross":
        aw, ah = max(2, round(0.4 * w)), max(2, round(0.4 * h))
        ax, ay = x0 + (w - aw) // 2, y0 + (h - ah) // 2
        draw.rectangle([ax, y0, ax + aw - 1, y1], fill=1, outline=1)
        draw.rectangle([x0, ay, x1, ay + ah - 1], fill=1, outline=1)
    else:
        raise MusarError(f"unknown shape {shape!r}")
    return np.array(img, dtype=bool)


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """4-neighbour binary erosion; outside the canvas counts as empty."""
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def pattern_mask(pattern: str, size: int, cx: float, cy: float) -> np.ndarray:
    """Where the pattern colour goes, before clipping to the object; anchored at (cx, cy)."""
    c = pattern_unit(size)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    bx = np.floor((xs - cx) / c + 0.5).astype(np.int64)
    by = np.floor((ys - cy) / c + 0.5).astype(np.int64)
    if pattern == "plain":
        return np.zeros((size, size), dtype=bool)
    if pattern == "stripes":
        return by % 2 == 0
    if pattern == "checks":
        return (bx + by) % 2 == 0
    if pattern == "dots":
        # Dots of diameter c on a grid of pitch 2c, one centred on the object.
        gx = xs - cx - 2 * c * np.round((xs - cx) / (2 * c))
        gy = ys - cy - 2 * c * np.round((ys - cy) / (2 * c))
        return gx**2 + gy**2 <= (c / 2) ** 2
    raise MusarError(f"unknown pattern {pattern!r}")


def render_array(scene: Scene) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array."""
    s = scene.size
    img = np.empty((s, s, 3), dtype=np.int16)
    img[:] = PALETTE[scene.background]
    if scene.texture == "speckled":
        noise = np.random.default_rng(scene.texture_seed).integers(-12, 13, size=(s, s, 1))
        img += noise.astype(np.int16)
    for p in scene.placements:
        x0, y0, side = p.box(s)
        body = shape_mask(p.identity.shape, s, x0, y0, side)
        img[body] = PALETTE[p.identity.body_colour]
        if p.identity.pattern_colour is not None:
            cx, cy = x0 + (side - 1) / 2, y0 + (side - 1) / 2
            pat = erode(body, rim_width(s)) & pattern_mask(p.identity.pattern, s, cx, cy)
            img[pat] = PALETTE[p.identity.pattern_colour]
    return np.clip(img, 0, 255).astype(np.uint8)


def render_scene(scene: Scene) -> Image.Image:
    return Image.fromarray(render_array(scene), mode="RGB")


def _boxes_apart(boxes: Sequence[tuple[int, int, int]], gap: int) -> bool:
    for i, (ax, ay, aw) in enumerate(boxes):
        for bx, by, bw in boxes[i + 1 :]:
            if ax < bx + bw + gap and bx < ax + aw + gap and ay < by + bw + gap and by < ay + aw + gap:
                return False
    return True


def sample_scene(
    rng: np.random.Generator,
    identities: Sequence[Identity],
    size: int = 64,
    regions: Sequence[str] | None = None,
    background: str | None = None,
    texture_prob: float = 0.0,
) -> Scene:
    """Place ``identities`` (1-4) in a random layout on a background none of them would vanish into.

    ``regions`` fixes the layout (one region per identity); ``background`` fixes the colour.
    """
    n = len(identities)
    if n not in LAYOUTS:
        raise MusarError(f"a scene holds 1 to {max(LAYOUTS)} subjects, not {n}")
    used = set().union(*(i.colours for i in identities))
    grounds = [b for b in BACKGROUNDS if b not in used]
    if background is None:
        background = grounds[rng.integers(len(grounds))]
    if regions is None:
        regions = LAYOUTS[n][rng.integers(len(LAYOUTS[n]))]
    lo, hi = SCALE_RANGE[n]
    textured = bool(rng.random() < texture_prob)
    tex_seed = int(rng.integers(2**31))
    for _ in range(100):
        placements = tuple(
            Placement(
                ident, reg, float(rng.uniform(lo, hi)), *(float(v) for v in rng.uniform(-JITTER, JITTER, 2))
            )
            for ident, reg in zip(identities, regions, strict=True)
        )
        if _boxes_apart([p.box(size) for p in placements], max(3, round(MIN_GAP * size))):
            break
    else:  # pragma: no cover - the scale ranges are chosen so this cannot happen
        raise MusarError(f"could not place {n} subjects apart at size {size}")
    return Scene(background, placements, size, "speckled" if textured else "plain", tex_seed)


def pair_padding(size: int) -> int:
    """Padding of the toy pair layout: Subjects200K's 8 px per 512 px view, at least 1 px."""
    return max(1, round(8 * size / 512))


def _split_seed(seed: int, index: int, stream: int) -> np.random.Generator:
    # One independent generator per (record, stream): record i does not depend on n or on the
    # other records, so make_pairs(10) is a prefix of make_pairs(100).
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def _perturb(identity: Identity, rng: np.random.Generator) -> Identity:
    """The same subject with its body colour changed: what a low objectConsistency score means."""
    bodies = [c for c in BODY_COLOURS if c not in identity.colours]
    return Identity(
        identity.shape, bodies[rng.integers(len(bodies))], identity.pattern, identity.pattern_colour
    )


@dataclass(frozen=True)
class PairSpec:
    """The parameters behind one Subjects200K-style record (kept for evaluation and tests)."""

    identity: Identity
    scenes: tuple[Scene, Scene]
    quality: dict[str, int]


def make_pair_specs(
    n: int,
    seed: int,
    size: int = 64,
    split: str | None = "train",
    low_quality_frac: float = 0.0,
    texture_prob: float = 0.0,
) -> list[PairSpec]:
    """Two views of one identity each, in scenes differing in background and region.

    A ``low_quality_frac`` share of rows gets one score below 5, and a low objectConsistency row
    really shows a different body colour in its second view, so the quality filter matters.
    """
    specs: list[PairSpec] = []
    for i in range(n):
        rng = _split_seed(seed, i, 0)
        ident = sample_identity(rng, split)
        grounds = [b for b in BACKGROUNDS if b not in ident.colours]
        bg = [grounds[j] for j in rng.choice(len(grounds), 2, replace=False)]
        regs = [SINGLE_REGIONS[j] for j in rng.choice(len(SINGLE_REGIONS), 2, replace=False)]
        quality = {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5}
        second = ident
        if rng.random() < low_quality_frac:
            key = ("compositeStructure", "objectConsistency", "imageQuality")[rng.integers(3)]
            quality[key] = int(rng.integers(1, 5))
            if key == "objectConsistency":
                second = _perturb(ident, rng)
                grounds2 = [b for b in BACKGROUNDS if b not in second.colours and b != bg[0]]
                bg[1] = grounds2[rng.integers(len(grounds2))]
        scenes = (
            sample_scene(rng, [ident], size, regions=[regs[0]], background=bg[0], texture_prob=texture_prob),
            sample_scene(rng, [second], size, regions=[regs[1]], background=bg[1], texture_prob=texture_prob),
        )
        specs.append(PairSpec(ident, scenes, quality))
    return specs


def pair_image(views: Sequence[Image.Image], padding: int | None = None) -> Image.Image:
    """Two square views side by side, each centred in its own padded tile (white padding).

    Same geometry as :func:`musar.data.subjects200k.view_boxes`: width 2S+4p, height S+2p.
    """
    size = views[0].width
    p = pair_padding(size) if padding is None else padding
    out = Image.new("RGB", (2 * size + 4 * p, size + 2 * p), (255, 255, 255))
    out.paste(views[0], (p, p))
    out.paste(views[1], (size + 3 * p, p))
    return out


def pair_record(spec: PairSpec, padding: int | None = None, brief: bool = False) -> dict[str, object]:
    """One row in exactly the Subjects200K schema (image as a PIL image).

    ``brief`` names the subject by its category in ``item`` and both descriptions, so a model
    trained on the rows must take the subject's look from the other view, not from the words.
    """
    views = [render_scene(s) for s in spec.scenes]
    return {
        "image": pair_image(views, padding),
        "collection": COLLECTION,
        "quality_assessment": dict(spec.quality),
        "description": {
            "item": subject_phrase(spec.identity, brief=brief),
            "category": spec.identity.category,
            "description_0": caption(spec.scenes[0], brief),
            "description_1": caption(spec.scenes[1], brief),
        },
    }


def make_pairs(
    n: int,
    seed: int,
    size: int = 64,
    padding: int | None = None,
    split: str | None = "train",
    low_quality_frac: float = 0.0,
    texture_prob: float = 0.0,
    brief: bool = False,
) -> list[dict[str, object]]:
    """``n`` Subjects200K rows of toy subjects (``split='train'`` keeps test identities out)."""
    specs = make_pair_specs(n, seed, size, split, low_quality_frac, texture_prob)
    return [pair_record(s, padding, brief) for s in specs]


def write_pairs_parquet(
    n: int,
    path: str | os.PathLike[str],
    seed: int,
    size: int = 64,
    padding: int | None = None,
    split: str | None = "train",
    low_quality_frac: float = 0.0,
    texture_prob: float = 0.0,
    brief: bool = False,
) -> Path:
    """Write :func:`make_pairs` rows as one Subjects200K parquet file (atomically).

    Readers must split its images with ``padding=pair_padding(size)`` (1 px at 64x64), not the
    8 px default of the real dataset.
    """
    from musar.data.schema import write_subjects200k_parquet  # pulls in `datasets`; only here

    records = make_pairs(n, seed, size, padding, split, low_quality_frac, texture_prob, brief)
    return write_subjects200k_parquet(records, path)


def make_multi_scenes(
    n: int,
    seed: int,
    max_objects: int = 2,
    size: int = 64,
    split: str | None = "train",
    min_objects: int = 1,
    same_category_prob: float = 0.2,
    texture_prob: float = 0.0,
) -> list[Scene]:
    """Scenes of ``min_objects``..``max_objects`` subjects for base text-to-image pretraining.

    Render with :func:`render_scene`, caption with :func:`caption`. ``same_category_prob`` makes a
    share of multi-subject scenes repeat one shape, the case routing has to disentangle.
    """
    if not 1 <= min_objects <= max_objects <= max(LAYOUTS):
        raise MusarError(f"objects per scene must satisfy 1 <= min <= max <= {max(LAYOUTS)}")
    scenes: list[Scene] = []
    for i in range(n):
        rng = _split_seed(seed, i, 1)
        k = int(rng.integers(min_objects, max_objects + 1))
        idents = [sample_identity(rng, split)]
        same = bool(rng.random() < same_category_prob)
        while len(idents) < k:
            cand = sample_identity(rng, split)
            # Keep a background free for everyone: at most four of the five background colours used.
            used = set().union(*(x.colours for x in idents), cand.colours)
            if (
                (not same or cand.shape == idents[0].shape)
                and cand not in idents
                and len(set(BACKGROUNDS) - used) > 0
            ):
                idents.append(cand)
        scenes.append(sample_scene(rng, idents, size, texture_prob=texture_prob))
    return scenes
