"""What ``musar bench`` measures: model presets and the settings of one run (no torch at import).

``flux-dev-random`` is the FLUX.1-dev architecture with random weights (speed does not depend on
trained weights); ``tiny`` is a seconds-long CPU smoke test, the same name as ``musar generate``'s
tiny preset. :mod:`musar.bench.train_step` and the GPU suite take the same two names.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from musar.errors import MusarError

if TYPE_CHECKING:
    import torch

SCHEMA = "musar.bench/1"
MODES = ("plain", "naive", "reference", "fast", "flex", "static_only", "independent", "cached")


@dataclass(frozen=True)
class BenchPreset:
    config: dict[str, Any]
    dtype: str
    device: str
    height: int
    width: int
    cond_size: int
    prompt_len: int
    phrase_len: int
    refs: tuple[int, ...]
    repeats: int
    warmup: int


FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
TINY_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
    "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),
}
PRESETS: dict[str, BenchPreset] = {
    "flux-dev-random": BenchPreset(FLUX_DEV_CONFIG, "bf16", "cuda", 1024, 1024, 512, 512, 32, (0, 1, 2, 3, 4), 10, 3),
    "tiny": BenchPreset(TINY_CONFIG, "fp32", "cpu", 128, 128, 64, 16, 4, (0, 1, 2), 3, 1),
}
# Spellings the bench commands once took; kept only to say the new name in argparse's one-line error.
RENAMED_PRESETS = {"flux-dev": "flux-dev-random"}


def preset_name(text: str) -> str:
    """argparse ``type=`` of every bench ``--preset``: an old name says what it became."""
    if text in RENAMED_PRESETS:
        raise argparse.ArgumentTypeError(f"preset {text!r} is now called {RENAMED_PRESETS[text]!r}")
    return text


@dataclass
class Settings:
    preset: str
    device: torch.device
    dtype: torch.dtype
    refs: list[int]
    height: int
    width: int
    cond_size: int
    prompt_len: int
    phrase_len: int
    repeats: int
    warmup: int
    modes: list[str]
    sdpa: str
    attention: bool
    seed: int
    config: dict[str, Any] = field(default_factory=dict)


def settings_from_args(args: argparse.Namespace) -> Settings:
    import torch

    from musar.utils.dtypes import torch_dtype

    name = args.preset or ("flux-dev-random" if torch.cuda.is_available() else "tiny")
    pre = PRESETS[name]
    device = torch.device(args.device or (pre.device if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MusarError("--device cuda, but this machine has no CUDA GPU")
    if name == "flux-dev-random" and device.type != "cuda":
        raise MusarError("the flux-dev-random preset (12B parameters) needs --device cuda; use --preset tiny on CPU")
    s = Settings(
        name, device, torch_dtype(args.dtype or pre.dtype), sorted(set(args.refs if args.refs is not None else pre.refs)),
        args.height or pre.height, args.width or pre.width, args.cond_size or pre.cond_size,
        args.prompt_len or pre.prompt_len, args.phrase_len or pre.phrase_len,
        args.repeats or pre.repeats, pre.warmup if args.warmup is None else args.warmup,
        list(args.modes or [m for m in MODES if m != "flex" or device.type == "cuda"]),
        args.sdpa, not args.no_attention, args.seed, dict(pre.config),
    )
    if min(s.refs) < 0 or s.repeats < 1 or s.warmup < 0:
        raise MusarError("--refs must be >= 0, --repeats >= 1 and --warmup >= 0")
    for what, px in (("--height", s.height), ("--width", s.width), ("--cond-size", s.cond_size)):
        if px < 16 or px % 16:
            raise MusarError(f"{what} must be a positive multiple of 16 (one token = 16x16 pixels), got {px}")
    return s


