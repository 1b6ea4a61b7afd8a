"""Read a toy-world image back into subjects and their attributes (issue 8, item 4).

The reader knows how :mod:`musar.toy.world` draws, but not the scene: it works on any RGB image,
rendered or generated. Every decision uses statistics that survive noise and slight colour drift:
nearest-palette classification, the background as the most common colour of the border, objects as
connected components of everything far from that background, shapes by overlap with the world's own
shape masks redrawn in the object's box, body colour from the object's rim (which the world always
draws in body colour), pattern colour from the pixels inside it, and pattern type from how that
second colour correlates with itself one pattern unit away (stripes, checks and dots differ in sign).
Scoring generations against their references is :mod:`musar.toy.analyser`'s, which re-exports
this module's public names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from musar.errors import MusarError
from musar.toy.world import (
    BODY_COLOURS,
    PALETTE,
    PATTERN_COLOURS,
    REGIONS,
    SHAPES,
    Identity,
    erode,
    pattern_unit,
    rim_width,
    shape_mask,
)

NOISY_SIGMA = 10.0  # per-channel noise (robust sigma of the border) above which masks are smoothed
_NAMES: tuple[str, ...] = tuple(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float64)
_BODY_IDX = np.array([_NAMES.index(c) for c in BODY_COLOURS])
_PATTERN_IDX = np.array([_NAMES.index(c) for c in PATTERN_COLOURS])
# Ideal (larger, smaller) axis-aligned and diagonal correlation of a pattern at one pattern unit.
_PATTERN_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "stripes": (1.0, -1.0, -1.0),
    "checks": (-1.0, -1.0, 1.0),
    "dots": (-0.25, -0.25, -0.25),
}


@dataclass(frozen=True)
class DetectedObject:
    """One subject found in an image. ``bbox`` is (x0, y0, x1, y1), x1/y1 exclusive."""

    bbox: tuple[int, int, int, int]
    area: int
    region: str
    scale: float
    shape: str
    shape_iou: float
    body_colour: str
    pattern: str
    pattern_colour: str | None

    def attributes(self) -> dict[str, str | None]:
        return {
            "shape": self.shape,
            "body_colour": self.body_colour,
            "pattern": self.pattern,
            "pattern_colour": self.pattern_colour,
        }

    def identity(self) -> Identity | None:
        """The world identity this object reads as, or None if the combination is impossible."""
        try:
            return Identity(self.shape, self.body_colour, self.pattern, self.pattern_colour)
        except ValueError:
            return None


@dataclass(frozen=True)
class Analysis:
    """Everything read from one image: background colour and objects, largest first."""

    size: tuple[int, int]
    background: str
    objects: tuple[DetectedObject, ...]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components: labels 0..n-1 on ``mask``, -1 elsewhere, numbered in raster order.

    Label propagation with pointer jumping in numpy; scipy is not a dependency.
    """
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        new = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        flat = new.ravel()
        on = flat < big
        for _ in range(4):  # jump to the label's label: collapses long chains in few rounds
            flat[on] = flat[flat[on]]
        if np.array_equal(new, lab):
            break
        lab = new
    roots, inverse = np.unique(lab[mask], return_inverse=True)
    out = np.full((h, w), -1, dtype=np.int64)
    out[mask] = inverse
    return out, len(roots)


def classify_pixels(arr: np.ndarray, sure_ratio: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette index per pixel, and whether it is sure: nearest < ``sure_ratio`` x second.

    Unsure pixels are blends (blurred edges, smeared patterns) and are left out of colour votes.
    """
    d = np.sqrt(((arr[..., None, :] - _RGB) ** 2).sum(-1))
    two = np.partition(d, 1, axis=-1)[..., :2]
    return d.argmin(-1), two[..., 0] < sure_ratio * two[..., 1]


def _nearest_region(cx: float, cy: float) -> str:
    return min(REGIONS, key=lambda r: (REGIONS[r][0] - cx) ** 2 + (REGIONS[r][1] - cy) ** 2)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Add the background pockets that do not reach the image border."""
    holes, n = label_components(~mask)
    if not n:
        return mask
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    return mask | ((holes >= 0) & ~np.isin(holes, edge))


def _close(mask: np.ndarray) -> np.ndarray:
    """Binary closing with the 4-neighbour cross: dilate, then erode."""
    p = np.pad(mask, 1)
    grown = mask | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return erode(np.pad(grown, 1, constant_values=True))[1:-1, 1:-1]


def _majority(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote (edges replicated)."""
    h, w = mask.shape
    p = np.pad(mask, 1, mode="edge").astype(np.int8)
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) >= 5


@functools.lru_cache(maxsize=4096)
def _template(shape: str, w: int, h: int, pad: int) -> np.ndarray:
    """``shape`` drawn in a box ``pad`` px larger all round than w x h, closed, cropped to w x h."""
    side = max(h, w) + 2 * pad + 2
    tmpl = _close(shape_mask(shape, side, 1, 1, w + 2 * pad, h + 2 * pad))[
        pad + 1 : pad + 1 + h, pad + 1 : pad + 1 + w
    ]
    tmpl.setflags(write=False)  # shared through the cache
    return tmpl


def _shape(comp: np.ndarray) -> tuple[str, float]:
    """Best shape by IoU with the world's mask drawn in the same box, or in one a pixel larger
    all round (noise filtering and blur shave off tips and corners, shrinking the box)."""
    h, w = comp.shape
    n = comp.sum()
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        for pad in (0, 1):
            tmpl = _template(shape, w, h, pad)
            inter = (tmpl & comp).sum()
            iou = inter / max(1, n + tmpl.sum() - inter)
            if iou > best_iou:
                best, best_iou = shape, float(iou)
    return best, best_iou


def _lag_corr(t: np.ndarray, valid: np.ndarray, dx: int, dy: int) -> float:
    """Correlation of ``t`` with itself shifted by (dx, dy) >= 0, over pairs inside ``valid``."""
    h, w = t.shape
    if dx >= w or dy >= h:
        return 0.0
    a, b = t[: h - dy, : w - dx], t[dy:, dx:]
    m = valid[: h - dy, : w - dx] & valid[dy:, dx:]
    if m.sum() < 4:
        return 0.0
    mu, sd = t[valid].mean(), t[valid].std()
    if sd < 1e-6:
        return 0.0
    return float(((a[m] - mu) * (b[m] - mu)).mean() / sd**2)


def _segment_votes(rgb: np.ndarray, anchor: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """Per candidate palette index, how many pixels lie on the segment anchor -> candidate.

    A blend of two colours (a blurred edge, a smeared stripe) lies on the segment between them, so
    it still votes for the right colour, where nearest-palette would call it a third one. A pixel
    votes for its nearest segment if it is past halfway and within 30% of the segment's length.
    """
    if len(cands) == 0 or len(rgb) == 0:
        return np.zeros(len(cands), dtype=np.int64)
    seg = _RGB[cands] - anchor
    rel = rgb[:, None, :] - anchor
    t = np.clip((rel * seg).sum(-1) / (seg**2).sum(-1), 0.0, 1.0)
    dist = np.linalg.norm(rel - t[..., None] * seg, axis=-1)
    best = dist.argmin(1)
    rows = np.arange(len(rgb))
    ok = (t[rows, best] >= 0.5) & (dist[rows, best] < 0.3 * np.linalg.norm(seg, axis=-1)[best])
    return np.bincount(best[ok], minlength=len(cands))


def _pattern(rgb: np.ndarray, inner: np.ndarray, body: int, bg: int, unit: int) -> tuple[str, str | None]:
    """Pattern colour from the pixels inside the body-colour rim, pattern type from periodicity."""
    total = int(inner.sum())
    cands = _PATTERN_IDX[(body != _PATTERN_IDX) & (bg != _PATTERN_IDX)]
    counts = _segment_votes(rgb[inner], _RGB[body], cands)
    if total == 0 or counts.max() < max(3, 0.05 * total):
        return "plain", None
    pc = int(cands[counts.argmax()])
    # Position of every pixel on the body -> pattern colour axis: blur and noise move it
    # smoothly instead of flipping a class, so the periodicity below survives them.
    axis = _RGB[pc] - _RGB[body]
    t = np.clip(((rgb - _RGB[body]) @ axis) / (axis @ axis), 0.0, 1.0)
    # At one pattern unit, stripes correlate +1 along and -1 across, checks -1 along both axes
    # and +1 diagonally, dots weakly negative everywhere. Orientation is ignored on purpose.
    along = sorted((_lag_corr(t, inner, unit, 0), _lag_corr(t, inner, 0, unit)))
    diag = _lag_corr(t, inner, unit, unit)
    feats = (along[1], along[0], diag)
    kind = min(
        _PATTERN_PROTOTYPES, key=lambda k: sum((p - f) ** 2 for p, f in zip(_PATTERN_PROTOTYPES[k], feats))
    )
    return kind, _NAMES[pc]


def analyse(image: Image.Image | np.ndarray, min_area: int | None = None) -> Analysis:
    """Find the background and every object of at least ``min_area`` px (default 0.4% of the image)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] < 3 or min(arr.shape[:2]) < 8:
        raise MusarError(
            f"analyse needs an RGB image of at least 8x8 pixels, got an array of shape {arr.shape}"
        )
    arr = arr[..., :3]
    h, w = arr.shape[:2]
    cls, sure = classify_pixels(arr)
    vote = np.where(sure, cls, len(_NAMES))  # an extra bin that no colour vote reads
    border = np.ones((h, w), dtype=bool)
    border[2:-2, 2:-2] = False
    bg = int(np.bincount(cls[border], minlength=len(_NAMES)).argmax())
    bg_rgb = np.median(arr[border & (cls == bg)], axis=0)
    others = np.delete(_RGB, bg, axis=0)
    thresh = 0.5 * np.sqrt(((others - bg_rgb) ** 2).sum(-1)).min()
    fg = np.sqrt(((arr - bg_rgb) ** 2).sum(-1)) > thresh
    # Grainy images (noisy generations) get a 3x3 majority vote on the mask, so single noisy pixels
    # neither join the foreground nor punch holes in it; clean renders keep their exact edges.
    noise = 1.4826 * np.median(np.abs(arr[border & (cls == bg)] - bg_rgb), axis=0).mean()
    if noise > NOISY_SIGMA:
        fg = _majority(fg)
    # Close 1-2 px cracks: a blurred pattern of two colours can average to the background's
    # colour along its edges and would cut an object apart. Objects are drawn further apart than
    # that, and shape templates get the same closing, so clean renders still match exactly.
    # Colours are read from the unclosed mask, where the closing added no background pixels.
    solid = _fill_holes(fg)
    labels, n = label_components(_fill_holes(_close(fg)))
    min_area = max(8, round(0.004 * h * w)) if min_area is None else min_area
    rim = rim_width(min(h, w))
    objects: list[DetectedObject] = []
    for k in range(n):
        comp = labels == k
        area = int(comp.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(comp)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        shape, iou = _shape(comp[y0:y1, x0:x1])
        crop, cvote = (comp & solid)[y0:y1, x0:x1], vote[y0:y1, x0:x1]
        inner = erode(crop, rim)
        ring = crop & ~inner
        # Body colour = the colour of the rim, backed by the whole object when the rim is unclear;
        # never the background's colour, which the world forbids and blurred edges fake.
        rgb = arr[y0:y1, x0:x1]
        cands = _BODY_IDX[bg != _BODY_IDX]
        n_ring = _segment_votes(rgb[ring], bg_rgb, cands)
        n_all = np.bincount(cvote[crop], minlength=len(_NAMES) + 1)[cands]
        score = n_ring / max(1, ring.sum()) + n_all / area
        body = int(cands[score.argmax()])
        pattern, pcol = _pattern(rgb, inner, body, bg, pattern_unit(min(h, w)))
        cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
        objects.append(
            DetectedObject(
                bbox=(x0, y0, x1, y1),
                area=area,
                region=_nearest_region(cx, cy),
                scale=max(x1 - x0, y1 - y0) / max(h, w),
                shape=shape,
                shape_iou=iou,
                body_colour=_NAMES[body],
                pattern=pattern,
                pattern_colour=pcol,
            )
        )
    objects.sort(key=lambda o: -o.area)
    return Analysis(size=(w, h), background=_NAMES[bg], objects=tuple(objects))
