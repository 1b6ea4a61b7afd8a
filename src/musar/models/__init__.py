"""MUSAR's model layer, composed over diffusers' FLUX modules.

* :mod:`~musar.models.layout` — which token sits where (pure data);
* :mod:`~musar.models.routing` — static and dynamic routing as pure functions;
* :mod:`~musar.models.boxes` — layout boxes -> per-token route candidates (pure);
* :mod:`~musar.models.dispatch` — every attention kernel call through diffusers' attention dispatch;
* :mod:`~musar.models.attention` — the attention processor, the routing context and the ``reference`` backend;
* :mod:`~musar.models.fast` — the ``fast`` backend (grouped unmasked calls);
* :mod:`~musar.models.flex` — the FlexAttention backend;
* :mod:`~musar.models.blocks` — FLUX block forwards with per-token-kind modulation;
* :mod:`~musar.models.forward_inputs` — the forward's conditions and position ids;
* :mod:`~musar.models.transformer` — :class:`MusarTransformer` (a ``FluxTransformer2DModel``);
* :mod:`~musar.models.cache` — the condition K/V cache.
"""

from __future__ import annotations

from musar.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "TokenLayout": "musar.models.layout",
    "Kind": "musar.models.layout",
    "RoutingOptions": "musar.models.options",
    "routing_accuracy": "musar.models.routing",
    "box_candidates": "musar.models.boxes",
    "check_boxes": "musar.models.boxes",
    "MusarAttnProcessor": "musar.models.attention",
    "RouteRecord": "musar.models.attention",
    "ConditionCache": "musar.models.cache",
    "ConditionInputs": "musar.models.forward_inputs",
    "MusarTransformer": "musar.models.transformer",
    "condition_image_ids": "musar.models.forward_inputs",
    "latent_image_ids": "musar.models.forward_inputs",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports("musar.models", _EXPORTS)
