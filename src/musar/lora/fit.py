"""Does a MUSAR LoRA file fit a model? Judged from the file's header and the model's config alone.

:func:`musar.lora.io.load_branch_lora` finds a misfit too, but only once the model is built and
its weights are loaded: minutes and tens of GB for FLUX.1-dev, to learn that the LoRA was made for
the toy model. Here the linear layers a FLUX transformer has, and their sizes, are derived from
its ``config.json`` (:func:`flux_linears`, tested equal to the built model's), the LoRA's tensors
are read from its safetensors header (names, shapes; no tensor data), and the two are compared.
Torch-free and allocation-free: what a hostile header declares is only ever compared.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from typing import Any

from musar.errors import MusarError
from musar.lora.config import BranchLoRAConfig
from musar.utils.safe_load import parse_json, shown
from musar.utils.tensorfile import read_header
from musar.utils.validation import check_lora_file

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<branch>noise|subject|shared)\.weight$")
_BLOCK = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<index>\d+)\.")
# What each kind of block is called in a transformer config, for the messages.
_BLOCK_KEYS = {"transformer_blocks": ("double", "num_layers"), "single_transformer_blocks": ("single", "num_single_layers")}


def _size(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    return default if value is None else int(value)


def transformer_width(config: Mapping[str, Any]) -> int:
    """The hidden width of a FLUX transformer: heads x head dim (FLUX.1: 24 x 128 = 3072)."""
    return _size(config, "num_attention_heads", 24) * _size(config, "attention_head_dim", 128)


def flux_linears(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Every ``nn.Linear`` of a ``FluxTransformer2DModel`` (and so of ``MusarTransformer``) with
    this config, as ``path -> (in_features, out_features)``, from the sizes alone.

    diffusers' defaults fill missing keys, as ``from_pretrained`` does. The MLP ratio is FLUX's
    fixed 4; ``tests/test_preload_checks.py`` compares this table with models built on the meta device.
    """
    d = transformer_width(config)
    in_ch, patch = _size(config, "in_channels", 64), _size(config, "patch_size", 1)
    out_ch = _size(config, "out_channels", in_ch)
    joint, pooled = _size(config, "joint_attention_dim", 4096), _size(config, "pooled_projection_dim", 768)
    out: dict[str, tuple[int, int]] = {}
    embedders = ["timestep_embedder", *(["guidance_embedder"] if config.get("guidance_embeds") else [])]
    for name in embedders:
        out[f"time_text_embed.{name}.linear_1"] = (256, d)
        out[f"time_text_embed.{name}.linear_2"] = (d, d)
    out["time_text_embed.text_embedder.linear_1"] = (pooled, d)
    out["time_text_embed.text_embedder.linear_2"] = (d, d)
    out["context_embedder"] = (joint, d)
    out["x_embedder"] = (in_ch, d)
    square = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out")
    for i in range(_size(config, "num_layers", 19)):
        p = f"transformer_blocks.{i}."
        out[p + "norm1.linear"] = out[p + "norm1_context.linear"] = (d, 6 * d)
        out.update({p + name: (d, d) for name in square})
        for ff in ("ff", "ff_context"):
            out[p + f"{ff}.net.0.proj"] = (d, 4 * d)
            out[p + f"{ff}.net.2"] = (4 * d, d)
    for i in range(_size(config, "num_single_layers", 38)):
        p = f"single_transformer_blocks.{i}."
        out[p + "norm.linear"] = (d, 3 * d)
        out[p + "proj_mlp"] = (d, 4 * d)
        out[p + "proj_out"] = (5 * d, d)
        out.update({p + name: (d, d) for name in ("attn.to_q", "attn.to_k", "attn.to_v")})
    out["norm_out.linear"] = (d, 2 * d)
    out["proj_out"] = (d, patch * patch * out_ch)
    return out


def expected_lora_shapes(lora: BranchLoRAConfig, linears: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The tensors :func:`musar.lora.model.inject_branch_lora` would create: name -> shape.

    ``lora_A`` is (rank, in), ``lora_B`` (out, rank), per branch of ``lora.mode``. A target
    pattern that matches no layer is a ``ValueError``, as injection would raise.
    """
    names = [n for n in linears if any(fnmatch.fnmatchcase(n, t) for t in lora.targets)]
    unmatched = [t for t in lora.targets if not any(fnmatch.fnmatchcase(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"its target patterns {unmatched} match no linear layer of the model")
    shapes: dict[str, tuple[int, int]] = {}
    for name in names:
        fan_in, fan_out = linears[name]
        for branch, (rank, _) in lora.branches().items():
            shapes[f"{name}.lora_A.{branch}.weight"] = (rank, fan_in)
            shapes[f"{name}.lora_B.{branch}.weight"] = (fan_out, rank)
    return shapes


def _blocks(keys: Any) -> dict[str, int]:
    """Per block kind, how many blocks ``keys`` reach (highest index + 1)."""
    counts: dict[str, int] = {}
    for key in keys:
        m = _BLOCK.match(key)
        if m:
            counts[m["kind"]] = max(counts.get(m["kind"], 0), int(m["index"]) + 1)
    return counts


def lora_misfit(
    shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, int]], config: Mapping[str, Any]
) -> str | None:
    """Why a LoRA's tensors (``shapes``) do not fit a model that expects ``expected``, or None.

    The reasons name the cause where it can be read off (another width, another number of
    blocks), else the first differing tensor.
    """
    file_blocks, model_blocks = _blocks(shapes), _blocks(expected)
    for kind, (noun, key) in _BLOCK_KEYS.items():
        have, want = file_blocks.get(kind, 0), model_blocks.get(kind, 0)
        if have != want:
            return (f"it has weights for {have} {noun} blocks ({kind}.*), the model has {want} "
                    f"({key} = {_size(config, key, want)})")
    width = transformer_width(config)
    for name, shape in shapes.items():
        want_shape = expected.get(name)
        if want_shape is None or tuple(shape) == want_shape:
            continue
        m = _KEY.match(name)
        if m and len(shape) == 2:
            # The width shows on A's input or B's output side wherever the model's is the width.
            side = shape[1] if m["ab"] == "A" else shape[0]
            want_side = want_shape[1] if m["ab"] == "A" else want_shape[0]
            if want_side == width and side != width:
                return (f"it was made for a transformer {side} wide, the model is {width} wide "
                        f"(num_attention_heads x attention_head_dim); {name} has shape {tuple(shape)}, "
                        f"the model expects {want_shape}")
        return f"{name} has shape {tuple(shape)}, the model expects {want_shape}"
    unknown = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    if unknown:
        return f"{len(unknown)} unknown keys, e.g. {unknown[0]!r}"
    if missing:
        return f"{len(missing)} keys missing, e.g. {missing[0]!r}"
    return None


def check_lora_fits(path: str | os.PathLike[str], transformer_config: Mapping[str, Any], model: str) -> None:
    """Refuse a MUSAR LoRA file that does not fit the transformer ``transformer_config`` describes,
    in one line naming the file, the model (``model``: where the config came from) and the misfit."""
    path = check_lora_file(path)  # format, bounds of the header's config
    header = read_header(path, "LoRA file")
    where = f"the LoRA config in {shown(path)}"
    raw = parse_json(header.metadata["lora_config"], where, expect=dict)
    try:
        lora = BranchLoRAConfig(**raw)
    except (TypeError, ValueError) as e:
        raise MusarError(f"{shown(path)} has an unreadable LoRA config in its header: {e}") from None
    prefix = f"LoRA file {shown(path)} does not match the model ({model})"
    try:
        expected = expected_lora_shapes(lora, flux_linears(transformer_config))
    except ValueError as e:
        raise MusarError(f"{prefix}: {e}") from None
    problem = lora_misfit({k: v.shape for k, v in header.tensors.items()}, expected, transformer_config)
    if problem is not None:
        raise MusarError(f"{prefix}: {problem}")
