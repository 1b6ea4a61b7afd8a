"""Quantised loading through diffusers' and transformers' own quantisation configs.

``--quantize`` (:mod:`musar.pipelines.quantization_spec`) becomes one diffusers
``PipelineQuantizationConfig`` whose ``quant_mapping`` names the transformer (a diffusers config)
and the T5 encoder ``text_encoder_2`` (the matching transformers config), exactly as diffusers
documents pipeline-level quantisation for FLUX. :meth:`MusarPipeline.from_pretrained` takes such a
config, or a model-level diffusers config for the transformer alone, via ``quantization_config=``
(it resolves the transformer's part itself, so this module imports the pipeline, never the reverse).
GGUF checkpoints are single files: the transformer comes from
``MusarTransformer.from_single_file(path, config=<model folder>, quantization_config=GGUFQuantizationConfig)``.

The branch LoRA sits on top: every quantised linear is still an ``nn.Linear`` (torchao swaps the
weight for a tensor subclass; bitsandbytes' ``Linear4bit`` and diffusers' ``GGUFLinear`` subclass
``nn.Linear``), so :func:`musar.lora.model.inject_branch_lora` wraps them unchanged and the LoRA
branches compute in the layer's compute dtype.

In-memory pipelines (presets such as ``tiny``) are quantised the same way, by a round trip through
a temporary folder: there is one loading path, diffusers', never a second hand-made one.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from musar.errors import MusarError
from musar.pipelines.quantization_spec import QuantizeSpec

if TYPE_CHECKING:
    from musar.models.transformer import MusarTransformer
    from musar.pipelines.pipeline_musar import MusarPipeline


def _torchao_config(mode: str) -> Any:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if mode == "int8wo" else Float8WeightOnlyConfig()


def transformer_config(spec: QuantizeSpec, dtype: torch.dtype) -> Any:
    """The diffusers quantisation config of the transformer for ``spec`` (None for ``none``)."""
    import diffusers

    if spec.mode in ("int8wo", "fp8wo"):
        return diffusers.TorchAoConfig(_torchao_config(spec.mode))
    if spec.mode == "nf4":
        return diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if spec.mode == "gguf":
        return diffusers.GGUFQuantizationConfig(compute_dtype=dtype)
    return None


def text_encoder_config(spec: QuantizeSpec, dtype: torch.dtype) -> Any:
    """The transformers quantisation config of T5 for ``spec``; GGUF files hold the transformer only."""
    import transformers

    if spec.mode in ("int8wo", "fp8wo"):
        return transformers.TorchAoConfig(quant_type=_torchao_config(spec.mode))
    if spec.mode == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return None


def pipeline_config(spec: QuantizeSpec, dtype: torch.dtype) -> Any:
    """``PipelineQuantizationConfig`` for the transformer and T5 (None for ``none`` and ``gguf``,
    whose transformer is loaded from its file by :func:`load_gguf_transformer`)."""
    if spec.mode in ("none", "gguf"):
        return None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(
        quant_mapping={"transformer": transformer_config(spec, dtype), "text_encoder_2": text_encoder_config(spec, dtype)}
    )


def load_gguf_transformer(
    spec: QuantizeSpec, config_source: str | os.PathLike[str], dtype: torch.dtype, device: str | None = None
) -> MusarTransformer:
    """The transformer from ``spec.path`` (a GGUF file) with the architecture of ``config_source``
    (a FLUX folder or hub id with a ``transformer/`` subfolder)."""
    from musar.models.transformer import MusarTransformer

    try:
        return MusarTransformer.from_single_file(
            str(spec.path), config=str(config_source), subfolder="transformer",
            quantization_config=transformer_config(spec, dtype), dtype=dtype, device=device,
        )
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MusarError(f"cannot load GGUF transformer {spec.path}: {first}") from None


def load_quantized_pipeline(
    source: str | os.PathLike[str], spec: QuantizeSpec, dtype: torch.dtype, device_map: str | None = None
) -> MusarPipeline:
    """A FLUX folder or hub id loaded with ``spec`` applied; ``device_map`` places (and, for
    torchao and bitsandbytes, quantises) the weights directly on that device."""
    from musar.pipelines.pipeline_musar import MusarPipeline

    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.mode == "gguf":
        kwargs["transformer"] = load_gguf_transformer(spec, source, dtype, device_map)
    else:
        kwargs["quantization_config"] = pipeline_config(spec, dtype)
        if device_map is not None:
            kwargs["device_map"] = device_map
    pipe = MusarPipeline.from_pretrained(source, **kwargs)
    if getattr(pipe, "hf_device_map", None) is not None:
        pipe.reset_device_map()  # keep the placement, drop the mapping, so .to() and offload work as usual
    return pipe


def quantize_pipeline(pipe: MusarPipeline, spec: QuantizeSpec, device_map: str | None = None) -> MusarPipeline:
    """An in-memory pipeline (a preset) quantised through the same loader, via a temporary folder.

    Consumes ``pipe``. Its transformer's dtype is kept (presets choose their own); a branch LoRA
    it carries is saved apart and loaded again on top of the quantised linears.
    """
    from musar.lora.io import save_branch_lora
    from musar.lora.model import remove_branch_lora

    dtype = pipe.transformer.dtype
    with tempfile.TemporaryDirectory(prefix="musar-quantize-") as tmp:
        lora = None
        if pipe.transformer.lora_config is not None:
            lora = save_branch_lora(pipe.transformer, os.path.join(tmp, "lora.safetensors"))
            remove_branch_lora(pipe.transformer)
        pipe.save_pretrained(os.path.join(tmp, "model"))
        quantized = load_quantized_pipeline(os.path.join(tmp, "model"), spec, dtype, device_map)
        if lora is not None:
            quantized.load_lora(lora)
            quantized.lora_path, quantized.lora_sha256 = pipe.lora_path, pipe.lora_sha256
    return quantized
