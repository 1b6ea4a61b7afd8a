"""A reference of every key of a dataclass config: dotted name, type, default and help text.

The help text is each field's ``metadata["help"]``, the same strings the config classes carry for
their readers, so the reference cannot drift from the code. ``musar train --help-config`` prints it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted: "optim.lr"; items of a list of sections: "validation.prompts[].prompt"
    type: str
    default: str
    help: str


def type_name(tp: Any) -> str:
    """A short, YAML-minded name for a field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(inner) + (" | null" if type(None) in args else "")
    if origin is Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "[" + ", ".join(type_name(a) for a in args) + "]"
        return f"list of {type_name(args[0]) if args else 'any'}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return "null" if value is None else repr(value)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _show(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _show(f.default_factory())
    return "(required)"


def _section_type(tp: Any) -> tuple[type | None, bool]:
    """(dataclass, is_list) when ``tp`` is a section or a list of sections."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (None,)
        if item is not None and dataclasses.is_dataclass(item):
            return item, True
    return None, False


def iter_keys(cls: type, prefix: str = "", base: Any = None) -> Iterator[KeyDoc]:
    """Every leaf key of dataclass ``cls``, sections flattened to dotted names, in field order.

    ``base``: the instance whose values are the defaults (a section's defaults are its parent's
    default section, e.g. ``TrainConfig.routing`` is ``RoutingOptions(backend="fast")``, not
    ``RoutingOptions()``); None = the class's own field defaults.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        section, is_list = _section_type(hints[f.name])
        if section is not None and not is_list:
            if base is not None:
                sub = getattr(base, f.name)
            elif f.default_factory is not dataclasses.MISSING:
                sub = f.default_factory()
            elif f.default is not dataclasses.MISSING:
                sub = f.default  # a frozen section instance, or None
            else:
                sub = None
            yield from iter_keys(section, key + ".", sub)
            continue
        default = _show(getattr(base, f.name)) if base is not None else _default(f)
        yield KeyDoc(key, type_name(hints[f.name]), default, str(f.metadata.get("help", "")))
        if section is not None:  # a list of sections: document the items' keys too
            yield from iter_keys(section, key + "[].")


def config_reference(cls: type, title: str) -> str:
    """The printed reference: one block per key, sections in field order."""
    lines = [title, ""]
    for doc in iter_keys(cls):
        lines.append(f"{doc.key}  ({doc.type}, default {doc.default})")
        if doc.help:
            lines.append(f"    {doc.help}")
    return "\n".join(lines) + "\n"
