"""What ``MusarPipeline.__call__`` returns: a diffusers ``BaseOutput`` like ``FluxPipelineOutput``.

``output.images`` / ``output["images"]`` / ``output[0]`` as in diffusers, plus the routing record
(with ``return_routing=True``), the noise-token grid the routing maps are drawn on, and timings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers.utils import BaseOutput

from musar.models.boxes import Box
from musar.pipelines.routing_maps import RoutingRecorder


@dataclass
class MusarPipelineOutput(BaseOutput):
    """Args:
    images: generated images (PIL list, numpy array or tensor, by ``output_type``; packed
        latents for ``output_type="latent"``).
    routing: S* and the routes of every step and layer, when ``return_routing=True``.
    grid: (rows, columns) of the noise-token grid, for routing maps.
    timings: seconds spent encoding, denoising and in total.
    boxes: the checked layout boxes (one per subject, or None), for drawing them.
    """

    images: Any
    routing: RoutingRecorder | None = None
    grid: tuple[int, int] = (0, 0)
    timings: dict[str, float] = field(default_factory=dict)
    boxes: list[Box | None] | None = None  # the checked subject boxes, for drawing them
