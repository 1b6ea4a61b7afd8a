"""MUSAR: multi-subject customization of FLUX.1-dev via attention routing.

``from musar import MusarPipeline`` works like ``from diffusers import FluxPipeline``; names are
imported on first use, so ``import musar`` (and the ``musar`` CLI) does not import torch.
"""

from __future__ import annotations

from musar.errors import MusarError
from musar.utils import quiet
from musar.utils.lazy import lazy_exports

quiet.install()  # known harmless library messages, each dropped for a stated reason (utils/quiet.py)

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "MusarPipeline": "musar.pipelines.pipeline_musar",
    "MusarPipelineOutput": "musar.pipelines.pipeline_musar",
    "MusarTransformer": "musar.models.transformer",
    "ConditionInputs": "musar.models.forward_inputs",
    "RoutingOptions": "musar.models.options",
    "TokenLayout": "musar.models.layout",
    "BranchLoRAConfig": "musar.lora.config",
    "load_pipeline": "musar.pipelines.presets",
}

__all__ = ["MusarError", "__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_exports("musar", _EXPORTS)
