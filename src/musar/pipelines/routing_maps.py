"""Routing maps: what dynamic routing decided, per step, as pictures (paper Fig. 5).

:class:`RoutingRecorder` is the ``capture`` callback of :class:`~musar.models.transformer.MusarTransformer`.
It keeps, per denoising step, S* averaged over heads and layers; the routes shown are the argmax
of that average. :func:`save_routing_grid` draws rows = conditions, columns = steps;
:func:`route_overlay` colours the final routes over the generated image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from musar.models.attention import RouteRecord
from musar.utils.io import atomic_path

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]


@dataclass
class RoutingRecorder:
    """Accumulates S* per step (mean over layers, heads already averaged or averaged here)."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (B, n, c) sum over layers
    counts: dict[int, int] = field(default_factory=dict)

    def __call__(self, record: RouteRecord) -> None:
        aff = record.affinity
        if aff.dim() == 4:  # per-head routing: show the head mean
            aff = aff.mean(dim=1)
        self.sums[record.step] = self.sums.get(record.step, 0) + aff.float()
        self.counts[record.step] = self.counts.get(record.step, 0) + 1

    @property
    def steps(self) -> list[int]:
        return sorted(self.sums)

    def affinity(self, step: int) -> torch.Tensor:
        """(B, n, c) S* of one step, averaged over the layers that routed."""
        return self.sums[step] / self.counts[step]

    def routes(self, step: int) -> torch.Tensor:
        return self.affinity(step).argmax(dim=-1)

    def to_dict(self) -> dict[str, object]:
        return {"steps": self.steps, "layers_per_step": [self.counts[s] for s in self.steps]}


def _cell(values: np.ndarray, grid: tuple[int, int], size: int) -> Image.Image:
    v = values.reshape(grid)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-12)
    return Image.fromarray((v * 255).astype(np.uint8), mode="L").resize((size, size * grid[0] // grid[1]), Image.Resampling.NEAREST)


def _routes_image(routes: np.ndarray, grid: tuple[int, int]) -> Image.Image:
    colours = np.array(PALETTE, dtype=np.uint8)[routes.reshape(grid) % len(PALETTE)]
    return Image.fromarray(colours, mode="RGB")


def save_routing_grid(
    recorder: RoutingRecorder, grid: tuple[int, int], labels: list[str], path: str | os.PathLike[str], cell: int = 96
) -> Path:
    """PNG: one row per condition (S*, brighter = more affinity) plus a row of argmax routes."""
    steps = recorder.steps
    if not steps:
        raise ValueError("no routing was recorded (dynamic routing needs 2+ subjects)")
    c = recorder.affinity(steps[0]).shape[-1]
    cell_h = cell * grid[0] // grid[1]
    label_w, pad = 140, 4
    width = label_w + len(steps) * (cell + pad)
    height = 18 + (c + 1) * (cell_h + pad)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, step in enumerate(steps):
        x = label_w + j * (cell + pad)
        draw.text((x, 2), f"step {step}", fill=(0, 0, 0))
        aff = recorder.affinity(step)[0].numpy()  # first sample
        for k in range(c):
            sheet.paste(_cell(aff[:, k], grid, cell).convert("RGB"), (x, 18 + k * (cell_h + pad)))
        routes = _routes_image(aff.argmax(-1), grid).resize((cell, cell_h), Image.Resampling.NEAREST)
        sheet.paste(routes, (x, 18 + c * (cell_h + pad)))
    for k in range(c):
        draw.rectangle((2, 18 + k * (cell_h + pad) + 2, 12, 18 + k * (cell_h + pad) + 12), fill=PALETTE[k % len(PALETTE)])
        draw.text((16, 18 + k * (cell_h + pad)), labels[k][:20], fill=(0, 0, 0))
    draw.text((16, 18 + c * (cell_h + pad)), "routes", fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)


def route_overlay(image: Image.Image, routes: torch.Tensor, grid: tuple[int, int], alpha: float = 0.45) -> Image.Image:
    """The generated image with each token's route colour blended over it."""
    colours = _routes_image(routes.numpy(), grid).resize(image.size, Image.Resampling.NEAREST)
    return Image.blend(image.convert("RGB"), colours, alpha)
