"""Pipelines: :class:`MusarPipeline` (a diffusers ``FluxPipeline``), reference conditions, routing
maps and the ready-made presets."""

from __future__ import annotations

from musar.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "MusarPipeline": "musar.pipelines.pipeline_musar",
    "MusarPipelineOutput": "musar.pipelines.pipeline_musar",
    "load_pipeline": "musar.pipelines.presets",
    "tiny_pipeline": "musar.pipelines.presets",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports("musar.pipelines", _EXPORTS)
