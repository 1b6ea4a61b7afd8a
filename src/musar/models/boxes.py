"""Subject boxes -> route candidates: the user-facing form of given routes (docs/design.md sec. 4a).

A box is ``(x0, y0, x1, y1)`` in fractions of the output image (x to the right, y down), one per
subject or ``None`` for a subject without a box. Each NOISE token is a cell of the packed latent
grid; its *centre* decides (closed intervals, so a centre on a shared edge is in both boxes):

* in exactly one box -> routed to that subject;
* in several boxes -> S* chooses among those subjects;
* in no box -> S* chooses among all subjects (``outside="all"``, the default), or the token
  reads no condition (``outside="none"``).

One subject: S* has nothing to choose from, so "choose among all" would read the reference
everywhere and make the box meaningless. A single subject *with* a box therefore reads its
reference only inside the box, whatever ``outside`` says; without a box it reads it everywhere.

The candidates act wherever dynamic routing acts (``RoutingOptions.start_layer`` /
``start_step`` still gate it): in earlier layers and steps every token sees every condition, as
without boxes. Nothing here imports torch at module level, so the CLI checks boxes before any
heavy import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from musar.errors import MusarError

if TYPE_CHECKING:
    import torch

Box = tuple[float, float, float, float]
OutsidePolicy = Literal["all", "none"]
OUTSIDE_POLICIES: tuple[str, ...] = ("all", "none")
DEFAULT_OUTSIDE: OutsidePolicy = "all"  # S* routes the tokens outside every box among all subjects
FLUX_TOKEN_PX = 16  # FLUX's VAE factor 8 x the 2x2 latent packing
_EDGE = 1e-9  # fractions are floats: a centre on an edge must not fall out by rounding


def _fmt(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def parse_box_args(raw: Sequence[Sequence[str]] | None, num_subjects: int) -> list[Box | None] | None:
    """``--box`` values (one list of strings per flag) -> one box or None per subject.

    Each flag is ``X0 Y0 X1 Y1`` or ``none``; given for every ``--subject`` in order, or not at all.
    """
    if not raw:
        return None
    boxes: list[Box | None] = []
    for k, values in enumerate(raw, 1):
        if len(values) == 1 and values[0].strip().lower() == "none":
            boxes.append(None)
            continue
        if len(values) != 4:
            raise MusarError(f"--box {k} takes 4 numbers X0 Y0 X1 Y1 or 'none', got {' '.join(values)!r}")
        try:
            boxes.append(tuple(float(v) for v in values))  # type: ignore[arg-type]
        except ValueError:
            raise MusarError(f"--box {k} takes 4 numbers X0 Y0 X1 Y1 or 'none', got {' '.join(values)!r}") from None
    if len(boxes) != num_subjects:
        raise MusarError(
            f"got {len(boxes)} --box for {num_subjects} subjects: give one --box per --subject, in order "
            "(--box none for a subject without a box), or none at all"
        )
    return boxes


def check_outside(outside: str) -> OutsidePolicy:
    if outside not in OUTSIDE_POLICIES:
        raise MusarError(f"outside_boxes must be one of {', '.join(OUTSIDE_POLICIES)}, got {outside!r}")
    return outside  # type: ignore[return-value]


def check_boxes(
    boxes: Sequence[Sequence[float] | None] | None,
    num_subjects: int,
    height: int,
    width: int,
    *,
    dynamic_routing: bool = True,
    outside: str = DEFAULT_OUTSIDE,
    token_px: int = FLUX_TOKEN_PX,
) -> list[Box | None] | None:
    """Validate boxes for ``num_subjects`` subjects at ``height`` x ``width``; one-line MusarError.

    Returns the boxes as float tuples (None stays None), or None when no boxes were given.
    ``token_px``: the side of one NOISE token in pixels (16 for FLUX); a box must cover one.
    """
    check_outside(outside)
    if boxes is None:
        if outside != "all":
            raise MusarError(f"outside_boxes={outside!r} needs boxes: it says what tokens outside every box read")
        return None
    if isinstance(boxes, (str, bytes)):
        raise MusarError("boxes must be a list with one (x0, y0, x1, y1) or None per subject")
    boxes = list(boxes)
    if len(boxes) != num_subjects:
        raise MusarError(
            f"got {len(boxes)} boxes for {num_subjects} subjects: give one (x0, y0, x1, y1) or None per subject, in order"
        )
    if not dynamic_routing:
        raise MusarError(
            "boxes steer dynamic routing, which is switched off: turn it on "
            "(drop --no-dynamic-routing / dynamic_routing=False) or give no boxes"
        )
    return [None if box is None else check_box(box, height, width, name=f"box {k}", token_px=token_px)
            for k, box in enumerate(boxes, 1)]


def check_box(
    box: Sequence[float], height: int, width: int, *, name: str = "box", token_px: int = FLUX_TOKEN_PX
) -> Box:
    """One box as a float tuple, or a one-line MusarError that starts with ``name``."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise MusarError(f"{name} must be 4 numbers (x0, y0, x1, y1), got {box!r}") from None
    if len(values) != 4:
        raise MusarError(f"{name} must be 4 numbers (x0, y0, x1, y1), got {len(values)}")
    bad = next((v for v in values if not math.isfinite(v)), None)
    if bad is not None:
        raise MusarError(f"{name} {_fmt(values)}: coordinates must be finite numbers, got {bad}")
    bad = next((v for v in values if not 0.0 <= v <= 1.0), None)
    if bad is not None:
        raise MusarError(f"{name} {_fmt(values)}: coordinates are fractions of the image in [0, 1], got {bad:g}")
    x0, y0, x1, y1 = values
    if x1 <= x0:
        raise MusarError(f"{name} {_fmt(values)}: x1 must be greater than x0")
    if y1 <= y0:
        raise MusarError(f"{name} {_fmt(values)}: y1 must be greater than y0")
    w_px, h_px = (x1 - x0) * width, (y1 - y0) * height
    if w_px < token_px - 1e-6 or h_px < token_px - 1e-6:
        raise MusarError(
            f"{name} {_fmt(values)} is {w_px:.3g}x{h_px:.3g} px at {width}x{height}, "
            f"smaller than one {token_px}x{token_px} px token"
        )
    return (x0, y0, x1, y1)


def parse_box_text(text: str | None) -> Box | None:
    """A box typed as text ("0.1 0.2 0.6 0.9", commas and brackets allowed); blank or "none" = None.

    Only the shape is checked here; :func:`check_box` checks the values.
    """
    cleaned = (text or "").strip().strip("()[]").replace(",", " ").split()
    if not cleaned or (len(cleaned) == 1 and cleaned[0].lower() == "none"):
        return None
    try:
        values = tuple(float(v) for v in cleaned)
    except ValueError:
        raise MusarError(f"a box is 4 numbers x0 y0 x1 y1 (fractions of the image), got {text!r}") from None
    if len(values) != 4:
        raise MusarError(f"a box is 4 numbers x0 y0 x1 y1 (fractions of the image), got {len(values)} numbers")
    return values  # type: ignore[return-value]


def token_box_membership(boxes: Sequence[Box | None], grid: tuple[int, int]) -> torch.Tensor:
    """(n, c) bool: whether each NOISE token's centre lies in subject k's box (row-major grid)."""
    import torch

    rows, cols = grid
    cy = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    cx = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols
    cy, cx = cy[:, None].expand(rows, cols).reshape(-1), cx[None, :].expand(rows, cols).reshape(-1)
    inside = torch.zeros(rows * cols, len(boxes), dtype=torch.bool)
    for k, box in enumerate(boxes):
        if box is not None:
            x0, y0, x1, y1 = box
            inside[:, k] = (cx >= x0 - _EDGE) & (cx <= x1 + _EDGE) & (cy >= y0 - _EDGE) & (cy <= y1 + _EDGE)
    return inside


def box_candidates(boxes: Sequence[Box | None], grid: tuple[int, int], outside: str = DEFAULT_OUTSIDE) -> torch.Tensor:
    """(n, c) bool route candidates of each NOISE token (see the module docstring for the rules).

    ``grid``: the (rows, columns) of NOISE tokens, row-major as FLUX packs them.
    """
    import torch

    check_outside(outside)
    inside = token_box_membership(boxes, grid)
    c = len(boxes)
    # With one subject, "S* chooses among all" would ignore its box; it reads only inside it.
    everywhere = outside == "all" and not (c == 1 and boxes[0] is not None)
    fill = torch.full_like(inside, everywhere)
    return torch.where(inside.any(dim=1, keepdim=True), inside, fill)


def token_labels_from_boxes(boxes: Sequence[Box | None], grid: tuple[int, int]) -> torch.Tensor:
    """(n,) int64: the subject of tokens in exactly one box, -1 elsewhere (for routing_accuracy)."""
    import torch

    inside = token_box_membership(boxes, grid)
    one = inside.sum(dim=1) == 1
    return torch.where(one, inside.long().argmax(dim=1), torch.full_like(one, -1, dtype=torch.long))
