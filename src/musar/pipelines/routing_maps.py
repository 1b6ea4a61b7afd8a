"""Routing maps: what dynamic routing decided, per step, as pictures (paper Fig. 5).

:class:`RoutingRecorder` is the ``capture`` callback of :class:`~musar.models.transformer.MusarTransformer`.
It keeps, per denoising step, S* averaged over heads and layers, and how often each NOISE token
took each route (the routes the attention actually used, given routes and boxes included).
:func:`save_routing_grid` draws rows = conditions, columns = steps; :func:`route_overlay`
colours the routes of a step over the generated image. Both draw the subject boxes if any.
:func:`save_routing_maps` writes a generation's maps (and ``routing.json``) as one unit: every
file is staged beside its target first, so a failure (a full disk) leaves the old maps whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from musar.models.attention import RouteRecord
from musar.models.boxes import Box
from musar.utils.io import StagedFiles, Writer, atomic_path, json_writer

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]
NO_CONDITION_COLOUR = (90, 90, 90)  # tokens that read no condition (outside every box with outside_boxes="none")


def subject_colour(k: int) -> tuple[int, int, int]:
    return PALETTE[k % len(PALETTE)]


@dataclass
class RoutingRecorder:
    """Accumulates, per step, S* (mean over layers and heads) and the routes the layers took.

    Sums stay on the device the routes were computed on, so recording costs no host sync per
    layer; the accessors return CPU tensors.
    """

    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (B, n, c) S* summed over layers
    route_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (B, n, c + 1) routes taken
    counts: dict[int, int] = field(default_factory=dict)  # step -> routed layers

    def __call__(self, record: RouteRecord) -> None:
        aff = record.affinity.float()
        if aff.dim() == 4:  # per-head routing: show the head mean
            aff = aff.mean(dim=1)
        taken = F.one_hot(record.routes.long(), aff.shape[-1] + 1).float()
        if taken.dim() == 4:  # per head: every head's route counts
            taken = taken.sum(dim=1)
        step = record.step
        self.sums[step] = self.sums[step] + aff if step in self.sums else aff.clone()
        self.route_counts[step] = self.route_counts[step] + taken if step in self.route_counts else taken
        self.counts[step] = self.counts.get(step, 0) + 1

    @property
    def steps(self) -> list[int]:
        return sorted(self.sums)

    @property
    def num_conditions(self) -> int:
        return next(iter(self.sums.values())).shape[-1] if self.sums else 0

    def affinity(self, step: int) -> torch.Tensor:
        """(B, n, c) S* of one step, averaged over the layers that routed (before any boxes)."""
        return (self.sums[step] / self.counts[step]).cpu()

    def routes(self, step: int) -> torch.Tensor:
        """(B, n) the route each token took most often at ``step`` over the routed layers (and heads);
        ties go to the lower index; ``c`` = no condition."""
        return self.route_counts[step].argmax(dim=-1).cpu()

    def shares(self, step: int) -> torch.Tensor:
        """(B, c + 1) share of NOISE tokens routed to each subject (last: no condition) at ``step``,
        averaged over the routed layers (and heads)."""
        counts = self.route_counts[step].sum(dim=1)
        return (counts / counts.sum(dim=-1, keepdim=True)).cpu()

    def route_share(self) -> dict[str, Any]:
        """Per subject, the share of NOISE tokens routed to it at each step (mean over the batch)."""
        steps = self.steps
        per_step = [self.shares(s).mean(dim=0).tolist() for s in steps]
        c = self.num_conditions
        return {
            "steps": steps,
            "subjects": [[round(row[k], 6) for row in per_step] for k in range(c)],
            "no_condition": [round(row[c], 6) for row in per_step],
        }

    def to_dict(self) -> dict[str, object]:
        return {"steps": self.steps, "layers_per_step": [self.counts[s] for s in self.steps], "route_share": self.route_share()}


def draw_boxes(
    image: Image.Image, boxes: Sequence[Box | None], width: int = 1, origin: tuple[int, int] = (0, 0),
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """Outline each subject's box in its colour on ``image`` (in place; returned for chaining).

    A 1 px black line just inside the coloured one keeps a box visible over its own route colour.
    ``origin`` / ``size``: the region of ``image`` the boxes' fractions refer to (default: all of it).
    """
    draw = ImageDraw.Draw(image)
    w, h = size or image.size
    ox, oy = origin
    for k, box in enumerate(boxes):
        if box is None:
            continue
        x0, y0, x1, y1 = box
        rect = [ox + round(x0 * w), oy + round(y0 * h), ox + max(round(x1 * w) - 1, 0), oy + max(round(y1 * h) - 1, 0)]
        draw.rectangle(rect, outline=subject_colour(k), width=width)
        inner = [rect[0] + width, rect[1] + width, rect[2] - width, rect[3] - width]
        if inner[2] > inner[0] and inner[3] > inner[1]:
            draw.rectangle(inner, outline=(0, 0, 0), width=1)
    return image


def _cell(values: np.ndarray, grid: tuple[int, int], size: int) -> Image.Image:
    v = values.reshape(grid)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-12)
    return Image.fromarray((v * 255).astype(np.uint8), mode="L").resize((size, size * grid[0] // grid[1]), Image.Resampling.NEAREST)


def _routes_image(routes: np.ndarray, grid: tuple[int, int], num_conditions: int | None = None) -> Image.Image:
    colours = np.array(PALETTE, dtype=np.uint8)[routes.reshape(grid) % len(PALETTE)]
    if num_conditions is not None:
        colours[routes.reshape(grid) == num_conditions] = NO_CONDITION_COLOUR
    return Image.fromarray(colours, mode="RGB")


def save_routing_grid(
    recorder: RoutingRecorder,
    grid: tuple[int, int],
    labels: list[str],
    path: str | os.PathLike[str],
    cell: int = 96,
    boxes: Sequence[Box | None] | None = None,
) -> Path:
    """PNG of :func:`routing_grid` at ``path``."""
    sheet = routing_grid(recorder, grid, labels, cell, boxes)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)


def routing_grid(
    recorder: RoutingRecorder,
    grid: tuple[int, int],
    labels: list[str],
    cell: int = 96,
    boxes: Sequence[Box | None] | None = None,
) -> Image.Image:
    """One row per condition (S*, brighter = more affinity) plus a row of the routes taken.

    With ``boxes``, row k shows subject k's box and the routes row shows every box.
    """
    steps = recorder.steps
    if not steps:
        raise ValueError("no routing was recorded (dynamic routing needs 2+ subjects, or boxes)")
    c = recorder.num_conditions
    cell_h = cell * grid[0] // grid[1]
    label_w, pad = 140, 4
    width = label_w + len(steps) * (cell + pad)
    height = 18 + (c + 1) * (cell_h + pad)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    any_none = False
    for j, step in enumerate(steps):
        x = label_w + j * (cell + pad)
        draw.text((x, 2), f"step {step}", fill=(0, 0, 0))
        aff = recorder.affinity(step)[0].numpy()  # first sample
        for k in range(c):
            y = 18 + k * (cell_h + pad)
            sheet.paste(_cell(aff[:, k], grid, cell).convert("RGB"), (x, y))
            if boxes is not None:
                own = [b if i == k else None for i, b in enumerate(boxes)]
                draw_boxes(sheet, own, width=2, origin=(x, y), size=(cell, cell_h))
        taken = recorder.routes(step)[0].numpy()
        any_none |= bool((taken == c).any())
        routes = _routes_image(taken, grid, c).resize((cell, cell_h), Image.Resampling.NEAREST)
        y = 18 + c * (cell_h + pad)
        sheet.paste(routes, (x, y))
        if boxes is not None:
            draw_boxes(sheet, boxes, width=2, origin=(x, y), size=(cell, cell_h))
    for k in range(c):
        draw.rectangle((2, 18 + k * (cell_h + pad) + 2, 12, 18 + k * (cell_h + pad) + 12), fill=subject_colour(k))
        draw.text((16, 18 + k * (cell_h + pad)), labels[k][:20], fill=(0, 0, 0))
    y = 18 + c * (cell_h + pad)
    draw.text((16, y), "routes", fill=(0, 0, 0))
    if any_none:
        draw.rectangle((2, y + 16, 12, y + 26), fill=NO_CONDITION_COLOUR)
        draw.text((16, y + 14), "no condition", fill=(0, 0, 0))
    return sheet


def route_overlay(
    image: Image.Image,
    routes: torch.Tensor,
    grid: tuple[int, int],
    alpha: float = 0.45,
    boxes: Sequence[Box | None] | None = None,
    num_conditions: int | None = None,
) -> Image.Image:
    """The generated image with each token's route colour blended over it, and the boxes drawn.

    ``num_conditions``: c, so tokens routed to no condition (route c) are drawn grey.
    """
    colours = _routes_image(routes.numpy(), grid, num_conditions).resize(image.size, Image.Resampling.NEAREST)
    out = Image.blend(image.convert("RGB"), colours, alpha)
    if boxes is not None:
        draw_boxes(out, boxes, width=max(1, min(image.size) // 128))
    return out


def _png(image: Image.Image) -> Writer:
    return lambda tmp: image.save(tmp, format="PNG")


def routing_map_writers(
    result: Any, image: Image.Image, phrases: Sequence[str], folder: str | os.PathLike[str],
    record: dict[str, Any] | None = None,
) -> dict[Path, Writer] | None:
    """``{path: write(tmp)}`` of one generation's maps in ``folder`` (None when nothing was
    routed); ``record``: extra fields of a ``routing.json`` written with them (None: no JSON)."""
    rec = result.routing
    if rec is None or not rec.steps:
        return None
    folder = Path(folder)
    sheet = routing_grid(rec, result.grid, list(phrases), boxes=result.boxes)
    overlay = route_overlay(image, rec.routes(rec.steps[-1])[0], result.grid, boxes=result.boxes, num_conditions=len(phrases))
    writers = {folder / "routing_grid.png": _png(sheet), folder / "route_overlay.png": _png(overlay)}
    if record is not None:
        writers[folder / "routing.json"] = json_writer(rec.to_dict() | record)
    return writers


def stage_routing_maps(
    result: Any, image: Image.Image, phrases: Sequence[str], folder: str | os.PathLike[str],
    record: dict[str, Any] | None = None,
) -> StagedFiles | None:
    """The maps of :func:`routing_map_writers`, written beside their targets, not yet in place:
    a caller that writes more files (the image) commits them once everything is written."""
    writers = routing_map_writers(result, image, phrases, folder, record)
    return None if writers is None else StagedFiles(writers)


def save_routing_maps(
    result: Any, image: Image.Image, phrases: Sequence[str], folder: str | os.PathLike[str],
    record: dict[str, Any] | None = None,
) -> tuple[Path, Path] | None:
    """``routing_grid.png`` and ``route_overlay.png`` (and ``routing.json`` with ``record``) of
    one generation in ``folder``, as one unit.

    ``result``: a pipeline output called with ``return_routing=True``; ``image`` its image. The
    overlay shows the routes of the last recorded step. None (nothing written) when no routing
    was recorded: dynamic routing acts only with 2+ subjects or boxes, and when it is on.
    """
    staged = stage_routing_maps(result, image, phrases, folder, record)
    if staged is None:
        return None
    with staged:
        grid_path, overlay_path = staged.commit()[:2]
    return grid_path, overlay_path
