"""Pure measurement functions of the toy gates: routing accuracy, token labels, rates with errors.

Everything here takes plain arrays or analyser verdicts and returns numbers, so each can be tested
on constructed inputs. The probes (:mod:`musar.toy.probes`) and the gate runner
(:mod:`musar.toy.gates`) only generate images and attention and feed them through these.

**Routing accuracy** (docs/design.md sec. 4a): the share of the tokens of subject k that routing sends to
k, where a token belongs to k when at least half of its pixels lie inside k's shape mask in the
*prompted* scene; tokens of no subject are ignored. The core package will get a function of the
same name and meaning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from musar.toy.analyser import ATTRIBUTES, Analysis, Verdict
from musar.toy.world import PALETTE, Scene, shape_mask

_NAMES = tuple(PALETTE)


def mean_se(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); NaNs are dropped, (nan, nan) if empty.

    For 0/1 outcomes this is the binomial error sqrt(p(1-p)/(n-1)) up to the n-1.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def subject_masks(scene: Scene) -> list[np.ndarray]:
    """One boolean (size, size) shape mask per placement, exactly as the world draws it."""
    out = []
    for p in scene.placements:
        x0, y0, side = p.box(scene.size)
        out.append(shape_mask(p.identity.shape, scene.size, x0, y0, side))
    return out


def token_labels(masks: Sequence[np.ndarray], token_px: int = 8, min_share: float = 0.5) -> np.ndarray:
    """(rows * cols,) int64: for each token cell (row-major, as FLUX packs latents), the index of
    the subject whose mask covers at least ``min_share`` of its pixels, else -1.

    Masks are disjoint in this world, so at most one subject can reach a share above one half.
    """
    if not masks:
        raise ValueError("token_labels needs at least one mask")
    h, w = masks[0].shape
    if h % token_px or w % token_px:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the token size {token_px}")
    rows, cols = h // token_px, w // token_px
    labels = np.full(rows * cols, -1, dtype=np.int64)
    best = np.zeros(rows * cols)
    for k, m in enumerate(masks):
        share = m.reshape(rows, token_px, cols, token_px).mean(axis=(1, 3)).ravel()
        take = (share >= min_share) & (share > best)
        labels[take] = k
        best = np.maximum(best, share)
    return labels


def scene_token_labels(scene: Scene, token_px: int = 8) -> np.ndarray:
    return token_labels(subject_masks(scene), token_px)


def routing_accuracy(routes: np.ndarray, token_labels: np.ndarray) -> float:
    """Share of labelled tokens (label >= 0) whose route equals their label.

    ``routes`` (..., n) integer routes, ``token_labels`` (n,) or broadcastable to ``routes``;
    all leading entries (steps, layers, samples) are pooled. NaN when no token is labelled.
    """
    import torch

    from musar.models.routing import routing_accuracy as core_accuracy

    r = torch.as_tensor(np.asarray(routes))
    lab = torch.as_tensor(np.broadcast_to(np.asarray(token_labels), r.shape).copy())
    return core_accuracy(r.reshape(-1), lab.reshape(-1)).overall


def late_steps(num_steps: int) -> list[int]:
    """The late half of the denoising steps (the second half, rounding the middle step in)."""
    return list(range(num_steps // 2, num_steps))


def attribute_rates(verdicts: Sequence[Verdict]) -> dict[str, tuple[float, float]]:
    """Per-attribute match rate over all reference subjects, with standard errors.

    ``pattern_colour`` counts a plain subject drawn plain as a match, as the analyser does;
    ``pattern_colour_patterned`` restricts it to subjects that have a pattern colour to copy.
    Also ``present`` (shape and body colour right) per subject, ``all_present`` per image,
    ``background`` per image and ``region`` per assigned subject.

    The analyser gives each subject the best match among *all* objects it finds, so an image
    cluttered with objects can score well by chance (an untrained model's noise does). Hence
    ``clean``: the image shows exactly as many objects as subjects, and ``all_present_strict``:
    clean, every subject present and each in its prompted region.
    """
    subs = [s for v in verdicts for s in v.subjects]
    out = {a: mean_se([s.matches[k] for s in subs]) for k, a in enumerate(ATTRIBUTES)}
    out["pattern_colour_patterned"] = mean_se(
        [s.matches[3] for s in subs if s.reference.pattern_colour is not None]
    )
    out["fidelity"] = mean_se([s.fidelity for s in subs])
    out["present"] = mean_se([s.present for s in subs])
    out["all_present"] = mean_se([v.all_present for v in verdicts])
    clean = [len(v.analysis.objects) == len(v.subjects) for v in verdicts]
    out["clean"] = mean_se(clean)
    out["all_present_strict"] = mean_se([
        ok and v.all_present and all(s.region_ok is not False for s in v.subjects)
        for ok, v in zip(clean, verdicts, strict=True)
    ])
    out["background"] = mean_se([v.background_ok for v in verdicts if v.background_ok is not None])
    out["region"] = mean_se([s.region_ok for s in subs if s.region_ok is not None])
    return out


def entanglement(verdicts: Sequence[Verdict]) -> tuple[float, float]:
    """Leaked / eligible attributes over all subjects (the analyser's definition), with a standard
    error from the per-image leak shares weighted by their eligible counts (a ratio estimator)."""
    leaks = np.array([v.leaks for v in verdicts if v.eligible], dtype=np.float64)
    elig = np.array([v.eligible for v in verdicts if v.eligible], dtype=np.float64)
    if elig.sum() == 0:
        return math.nan, math.nan
    rate = leaks.sum() / elig.sum()
    if len(elig) < 2:
        return float(rate), math.nan
    resid = leaks - rate * elig
    se = math.sqrt((resid**2).sum() / (len(elig) - 1) / len(elig)) / elig.mean()
    return float(rate), float(se)


def diptych_artefact(image: Image.Image | np.ndarray, analysis: Analysis, subjects: int) -> bool:
    """Whether a square generation looks like a two-panel image: its left and right halves have
    different background colours (a panel seam), or it shows more objects than were asked for
    (a subject drawn once per panel)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)[..., :3]
    w = arr.shape[1]
    halves = [background_of(arr[:, : w // 2]), background_of(arr[:, w // 2 :])]
    return halves[0] != halves[1] or len(analysis.objects) > subjects


def background_of(arr: np.ndarray) -> str:
    """The most common palette colour of an image region's 2-pixel border."""
    from musar.toy.analyser import classify_pixels

    cls, _ = classify_pixels(arr)
    border = np.ones(cls.shape, dtype=bool)
    border[2:-2, 2:-2] = False
    return _NAMES[int(np.bincount(cls[border], minlength=len(_NAMES)).argmax())]


def fmt(value: tuple[float, float] | float, digits: int = 2) -> str:
    """'0.93 ± 0.02' (or 'n/a'); a bare float prints without an error."""
    if isinstance(value, tuple):
        m, se = value
        if math.isnan(m):
            return "n/a"
        return f"{m:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
