"""Named presets and component plugins, registered through package entry points.

The core knows one preset of its own (``tiny``, random weights). Other packages add theirs under
the ``musar.presets`` entry-point group (name -> ``module:attribute`` holding a
:class:`PresetSpec`); the miniature world registers ``toy`` this way, so the core never imports
it. The ``musar.components`` group lists modules that define diffusers components (the toy
codec): diffusers only loads a component class whose module is already imported, and imports no
module just because a folder names it, so :func:`import_registered_components` imports a
registered module when a folder's ``model_index.json`` asks for it. A folder can never make us
import anything that is not registered.

Nothing here imports torch or any layer above utils/: the CLI checks preset names before loading
any model, and utils/ (quiet.py, validation.py) reads the registered names.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from musar.errors import MusarError
from musar.utils.safe_load import read_json

PRESET_GROUP = "musar.presets"
COMPONENT_GROUP = "musar.components"
# Named as an entry point names it: a string, imported only by get_preset (no import upwards).
BUILTIN_PRESETS: dict[str, str] = {"tiny": "musar.pipelines.presets:TINY"}


@dataclass(frozen=True)
class PresetSpec:
    """A ready-made pipeline. ``build(with_default_lora)`` returns it on the CPU in fp32."""

    name: str
    description: str
    build: Callable[[bool], Any]
    random_weights: bool = False


def _registered_presets() -> dict[str, str]:
    found = {ep.name: ep.value for ep in entry_points(group=PRESET_GROUP)}
    return {**found, **BUILTIN_PRESETS}


def preset_names() -> list[str]:
    return sorted(_registered_presets())


def check_preset(name: str) -> None:
    """A one-line error for an unknown preset name (cheap: no module is imported)."""
    names = preset_names()
    if name not in names:
        raise MusarError(f"unknown preset {name!r}; expected one of {', '.join(names)}")


def get_preset(name: str) -> PresetSpec:
    check_preset(name)
    module, _, attr = _registered_presets()[name].partition(":")
    spec = getattr(importlib.import_module(module), attr)
    if not isinstance(spec, PresetSpec):
        raise TypeError(f"preset entry point {name!r} ({module}:{attr}) is not a PresetSpec")
    return spec


def registered_component_modules() -> set[str]:
    return {ep.value for ep in entry_points(group=COMPONENT_GROUP)}


def import_registered_components(folder: str | os.PathLike[str]) -> None:
    """Import the registered component modules a local pipeline folder's model_index.json names."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return
    try:
        entries = read_json(index, "model index", expect=dict).values()
    except MusarError:
        return  # the pipeline's own read of the index reports it in one line
    allowed = registered_component_modules()
    for entry in entries:
        if isinstance(entry, list) and entry and entry[0] in allowed:
            importlib.import_module(entry[0])
