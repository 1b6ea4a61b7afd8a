"""diffusers' LoRA API on :class:`~musar.pipelines.pipeline_musar.MusarPipeline`.

``load_lora_weights`` / ``save_lora_weights`` / ``unload_lora_weights`` / ``set_adapters`` /
``delete_adapters`` / ``fuse_lora`` / ``disable_lora`` behave as on ``FluxPipeline``, for two kinds
of files side by side:

* a **MUSAR LoRA** (``musar.lora.io``: ``<module>.lora_{A,B}.{noise,subject}.weight`` and a
  header that says ``musar-branch-lora``), loaded exactly as :meth:`load_lora` loads it, under the
  adapter name ``"musar"`` unless told otherwise;
* any **standard FLUX LoRA** diffusers reads (peft/diffusers, kohya, XLabs, BFL... — what
  ``FluxPipeline.save_lora_weights`` writes and community LoRAs use), loaded by diffusers and peft
  themselves (:mod:`musar.lora.stacking` keeps the two LoRAs nested the same way in either order).
  By default it adapts every token; ``token_kinds=("prompt", "noise")`` limits it to those rows.

The MUSAR LoRA is the pipeline's conditioning, like an IP-Adapter: ``set_adapters`` changes its
weight when it is named and leaves it alone otherwise, so ``set_adapters(["style"], [0.8])``
sets the style LoRA as in diffusers without switching MUSAR off. ``disable_lora``,
``delete_adapters("musar")`` and ``unload_lora_weights`` do reach it.

Fusing: a standard LoRA that adapts every token is fused exactly (peft merges ``W + s B A``).
The MUSAR LoRA and any LoRA restricted to token kinds cannot be fused: a fused weight acts on
every row that passes through the linear, while these act on some rows only (MUSAR: none on
PROMPT rows, the rank-4 branch on NOISE rows, the rank-128 branch on condition rows) — no single
matrix is three different maps on the rows of one matmul.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from musar.errors import MusarError
from musar.lora.io import is_branch_lora_file, load_branch_lora, save_branch_lora
from musar.lora.model import release_hosts, remove_branch_lora
from musar.lora.stacking import forget_adapters, parse_token_kinds, restrict_adapter, unwrapped_hosts
from musar.utils.io import file_sha256
from musar.utils.quiet import quiet_lora_loading

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name
MUSAR_KEY = re.compile(r"\.lora_[AB]\.(noise|subject|shared)\.weight$")
MUSAR_ADAPTER = "musar"
NOT_FUSABLE = (
    "cannot fuse {name!r}: it adapts some token rows only (a fused weight acts on every row); "
    "fuse only LoRAs that adapt every token"
)


def find_musar_file(source: Any, weight_name: str | None = None, subfolder: str | None = None) -> Path | None:
    """The local MUSAR LoRA file ``load_lora_weights(source, weight_name=...)`` names, if it is one."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source) / subfolder if subfolder else Path(source)
    if path.is_dir():
        if weight_name is not None:
            path = path / weight_name
        elif (path / LORA_WEIGHT_NAME).is_file():
            path = path / LORA_WEIGHT_NAME
        else:
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                return None  # diffusers explains what it finds there
            path = files[0]
    return path if path.is_file() and is_branch_lora_file(path) else None


class _class_or_instance_method:
    """diffusers' ``save_lora_weights`` is a classmethod; ours also saves an instance's MUSAR LoRA."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        return functools.partial(self.func, owner if obj is None else obj)


class MusarLoraLoaderMixin:
    """LoRA loading for ``MusarPipeline`` (put before ``FluxPipeline`` in the bases)."""

    lora_path: str | None = None
    lora_sha256: str | None = None
    transformer: Any

    # -- MUSAR LoRA ---------------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike[str], adapter_name: str | None = None) -> None:
        """Load MUSAR branch-LoRA weights (safetensors) into the transformer."""
        load_branch_lora(self.transformer, path)
        self.transformer.lora_plan.adapter_name = adapter_name or MUSAR_ADAPTER
        self.lora_path, self.lora_sha256 = str(path), file_sha256(path)

    def _musar_adapter(self) -> str | None:
        if getattr(self.transformer, "lora_config", None) is None:
            return None
        return self.transformer.lora_plan.adapter_name

    def _peft_adapters(self) -> list[str]:
        names: list[str] = []
        for component in ("transformer", "text_encoder"):
            config = getattr(getattr(self, component, None), "peft_config", None) or {}
            names += [n for n in config if n not in names]
        return names

    # -- diffusers' API -----------------------------------------------------------------------

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike[str] | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        token_kinds: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Load a MUSAR LoRA or a standard FLUX LoRA (see the module docstring).

        ``token_kinds`` (standard LoRAs only): adapt rows of these kinds only, from ``prompt``,
        ``noise``, ``cond_image``, ``cond_text`` and ``condition`` (= both condition kinds).
        None (default): every token, exactly as on ``FluxPipeline``.
        """
        source = pretrained_model_name_or_path_or_dict
        musar_file = find_musar_file(source, kwargs.get("weight_name"), kwargs.get("subfolder"))
        if musar_file is not None:
            if token_kinds is not None:
                raise MusarError("token_kinds is for standard LoRAs: a MUSAR LoRA's branches choose their own rows")
            if hotswap:
                raise MusarError("hotswap is for standard LoRAs; load a MUSAR LoRA again to replace its weights")
            self.load_lora(musar_file, adapter_name)
            return
        if isinstance(source, dict) and any(MUSAR_KEY.search(k) for k in source):
            raise MusarError("a MUSAR LoRA loads from its safetensors file (its header holds the branch config), not a dict")
        kinds = parse_token_kinds(token_kinds)
        if kinds is not None and hotswap:
            raise MusarError("token_kinds cannot be combined with hotswap")
        if adapter_name is not None and adapter_name == self._musar_adapter():
            raise MusarError(f"adapter name {adapter_name!r} is the MUSAR LoRA's; choose another")
        transformer = self.transformer
        before = set(getattr(transformer, "peft_config", None) or {})
        with unwrapped_hosts(transformer), quiet_lora_loading():
            super().load_lora_weights(source, adapter_name=adapter_name, hotswap=hotswap, **kwargs)  # type: ignore[misc]
        if kinds is not None:
            for name in sorted(set(getattr(transformer, "peft_config", None) or {}) - before):
                restrict_adapter(transformer, name, kinds)

    @_class_or_instance_method
    def save_lora_weights(
        self_or_cls: Any,
        save_directory: str | os.PathLike[str],
        transformer_lora_layers: dict[str, Any] | None = None,
        text_encoder_lora_layers: dict[str, Any] | None = None,
        weight_name: str | None = None,
        is_main_process: bool = True,
        metadata: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Path | None:
        """As ``FluxPipeline.save_lora_weights`` when given LoRA layers (or called on the class);
        on a pipeline without them, saves its MUSAR LoRA to ``save_directory/weight_name``
        (default ``pytorch_lora_weights.safetensors``, which ``load_lora_weights(folder)`` finds)."""
        if isinstance(self_or_cls, type) or transformer_lora_layers is not None or text_encoder_lora_layers is not None:
            cls = self_or_cls if isinstance(self_or_cls, type) else type(self_or_cls)
            super(MusarLoraLoaderMixin, cls).save_lora_weights(  # type: ignore[misc]
                save_directory, transformer_lora_layers=transformer_lora_layers,
                text_encoder_lora_layers=text_encoder_lora_layers, weight_name=weight_name,
                is_main_process=is_main_process, **kwargs,
            )
            return None
        if getattr(self_or_cls.transformer, "lora_config", None) is None:
            raise MusarError("this pipeline has no MUSAR LoRA to save (save a standard LoRA with transformer_lora_layers=...)")
        if not is_main_process:
            return None
        path = Path(save_directory) / (weight_name or LORA_WEIGHT_NAME)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_branch_lora(self_or_cls.transformer, path, metadata)

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False) -> None:
        """Remove every LoRA, the MUSAR LoRA included: the transformer is the base model again."""
        transformer = self.transformer
        if getattr(transformer, "lora_config", None) is not None:
            remove_branch_lora(transformer)
        release_hosts(transformer, everything=True)
        self.lora_path = self.lora_sha256 = None
        super().unload_lora_weights(reset_to_overwritten_params=reset_to_overwritten_params)  # type: ignore[misc]

    def set_adapters(
        self, adapter_names: list[str] | str, adapter_weights: float | dict | list[float | dict | None] | None = None
    ) -> None:
        """diffusers' ``set_adapters``; naming the MUSAR LoRA sets its weight, leaving it out keeps it."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"Length of adapter names {len(names)} is not equal to the length of the weights {len(weights)}")
        musar = self._musar_adapter()
        known = set(self._peft_adapters()) | ({musar} if musar else set())
        missing = set(names) - known
        if missing:
            raise ValueError(f"Adapter name(s) {missing} not in the list of present adapters: {known}.")
        rest = [(n, w) for n, w in zip(names, weights) if n != musar]
        for name, weight in zip(names, weights):
            if name == musar:
                if isinstance(weight, dict):
                    raise MusarError("the MUSAR LoRA takes one weight, not a per-block dict")
                self.transformer.lora_plan.branch_scale = 1.0 if weight is None else float(weight)
        if self._peft_adapters():
            super().set_adapters([n for n, _ in rest], [w for _, w in rest])  # type: ignore[misc]

    def get_list_adapters(self) -> dict[str, list[str]]:
        adapters = super().get_list_adapters()  # type: ignore[misc]
        musar = self._musar_adapter()
        if musar is not None and musar not in adapters.setdefault("transformer", []):
            adapters["transformer"].append(musar)
        return adapters

    def get_active_adapters(self) -> list[str]:
        active = list(super().get_active_adapters())  # type: ignore[misc]
        musar = self._musar_adapter()
        if musar is not None and self.transformer.lora_plan.branches_enabled:
            active.append(musar)
        return active

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        musar = self._musar_adapter()
        if musar is not None and musar in names:
            remove_branch_lora(self.transformer)
            self.lora_path = self.lora_sha256 = None
            names.remove(musar)
        if names:
            super().delete_adapters(names)  # type: ignore[misc]
            forget_adapters(self.transformer, names)

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Fuse standard LoRAs that adapt every token (default: all such active ones)."""
        plan = getattr(self.transformer, "lora_plan", None)
        restricted = set(plan.adapter_kinds) if plan is not None else set()
        musar = self._musar_adapter()
        if adapter_names is not None:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            for name in names:
                if name == musar or name in restricted:
                    raise MusarError(NOT_FUSABLE.format(name=name))
        else:
            names = [n for n in self.get_active_adapters() if n != musar and n not in restricted]
            if not names:
                raise MusarError(NOT_FUSABLE.format(name=musar or sorted(restricted)[0]) if musar or restricted
                                 else "no LoRA to fuse")
        super().fuse_lora(  # type: ignore[misc]
            components=components or ["transformer"], lora_scale=lora_scale, safe_fusing=safe_fusing,
            adapter_names=names, **kwargs,
        )

    def disable_lora(self) -> None:
        """Switch every LoRA off (the MUSAR LoRA too) until :meth:`enable_lora`."""
        self._switch(False)

    def enable_lora(self) -> None:
        self._switch(True)

    def _switch(self, enabled: bool) -> None:
        plan = getattr(self.transformer, "lora_plan", None)
        if plan is not None:
            plan.branches_enabled = enabled
        if self._peft_adapters():
            (super().enable_lora if enabled else super().disable_lora)()  # type: ignore[misc]
