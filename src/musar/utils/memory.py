"""The memory a run needs, estimated from the model's config before anything is allocated (issue 22).

Some bounds depend on the machine: 4096 x 4096 px with 16 references is fine on an 80 GB GPU and
hopeless on a laptop, so no fixed range can say which. Here the run's size (pixels, references,
batch) and the model's (width, blocks, parameters) give an estimate, compared with what the
device has free *before* any weight loads:

* **weights**: every parameter at the size it loads in (``--dtype``, or the quantised size), all
  of them on the device that runs, except under ``--offload`` (then the largest component on the
  GPU, the rest in RAM);
* **activations** at the peak of one step: ``INFER_LIVE`` tensors of (tokens x width) alive inside
  one transformer block (input, normed input, q, k, v, attention output and the 4x MLP hidden),
  or the VAE decoder's full-resolution maps, whichever is larger; training keeps each block's
  input for the backward pass (all of its activations without gradient checkpointing) and the
  LoRA's gradients and AdamW states.

The estimate is deliberately a floor: attention scores are left out (SDPA's flash and efficient
kernels never hold them), so are caches and fragmentation. A run is refused only when the
estimate exceeds :data:`REFUSE_RATIO` times the free memory: a refusal means it cannot fit,
never that it might not. A run that passes may still run out; the error boundary reports that
as before (exit 1). Pure: nothing here imports torch except :func:`free_bytes` on a CUDA device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musar.errors import MusarError

GIB = 1024**3
REFUSE_RATIO = 1.5  # refuse only when the floor estimate is half again more than what is free
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2}
# Bytes a quantised parameter takes (weights plus their scales), per --quantize mode.
QUANT_BYTES: dict[str, float] = {"int8wo": 1.0, "fp8wo": 1.0, "nf4": 0.55}
INFER_LIVE = 10  # (tokens x width) tensors alive inside one block: see the module docstring
VAE_LIVE = 3  # a decoder conv's input, its output and one normalised copy, at full resolution
TRAIN_LIVE = 14  # (tokens x width) tensors one block keeps for its backward pass
ADAMW_BYTES = 8  # two fp32 moments per trainable parameter


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs of a model, read from its config files (nothing built)."""

    width: int  # transformer hidden size, heads x head dim
    blocks: int  # double + single transformer blocks
    token_px: int  # pixels per side of one token (VAE factor x the 2x2 packing x patch)
    transformer_params: int
    t5_params: int
    other_params: int  # CLIP and the VAE
    vae_channels: int = 128  # channels of the decoder's full-resolution stage (FLUX's VAE: 128)


@dataclass(frozen=True)
class Estimate:
    """Bytes a run needs on its device (``weights + activations``) and in host RAM when offloaded."""

    weights: float
    activations: float
    host: float = 0.0  # offloaded weights held in RAM

    @property
    def total(self) -> float:
        return self.weights + self.activations


def gib(n: float) -> str:
    return f"{n / GIB:.3g}"


def sequence_tokens(
    size: ModelSize, height: int, width: int, refs: int, condition_size: int, prompt_tokens: int, phrase_tokens: int
) -> int:
    """Tokens of one sample in the joint attention: prompt, image, and per reference its image and phrase."""
    image = math.ceil(height / size.token_px) * math.ceil(width / size.token_px)
    condition = math.ceil(condition_size / size.token_px) ** 2
    return prompt_tokens + image + refs * (condition + phrase_tokens)


def weight_bytes(size: ModelSize, dtype: str, quantize: str = "none", gguf_bytes: int | None = None) -> dict[str, float]:
    """Bytes of each component's weights as they load: transformer, t5, other (CLIP + VAE)."""
    full = DTYPE_BYTES[dtype]
    mode = quantize.split(":", 1)[0]
    quant = QUANT_BYTES.get(mode, full)
    transformer = gguf_bytes if mode == "gguf" and gguf_bytes is not None else size.transformer_params * quant
    return {"transformer": float(transformer), "t5": size.t5_params * quant, "other": size.other_params * full}


def _placed(components: Mapping[str, float], offload: str) -> tuple[float, float]:
    """(bytes on the device, bytes in host RAM) of the weights under ``offload``."""
    total = sum(components.values())
    if offload == "model":  # one component on the GPU at a time
        return max(components.values()), total
    if offload == "sequential":  # one layer at a time: negligible on the GPU
        return 0.0, total
    return total, 0.0


def estimate_generation(
    size: ModelSize, *, height: int, width: int, refs: int, condition_size: int, prompt_tokens: int,
    phrase_tokens: int, num_images: int = 1, dtype: str = "bf16", quantize: str = "none", offload: str = "none",
    gguf_bytes: int | None = None,
) -> Estimate:
    """Floor of the memory one ``MusarPipeline`` call needs (see the module docstring)."""
    act = DTYPE_BYTES[dtype]
    tokens = sequence_tokens(size, height, width, refs, condition_size, prompt_tokens, phrase_tokens)
    transformer = num_images * tokens * size.width * act * INFER_LIVE
    vae = num_images * height * width * size.vae_channels * act * VAE_LIVE
    device, host = _placed(weight_bytes(size, dtype, quantize, gguf_bytes), offload)
    return Estimate(device, float(max(transformer, vae)), host)


def estimate_training(
    size: ModelSize, *, batch_size: int, height: int, width: int, refs: int, condition_size: int, prompt_tokens: int,
    phrase_tokens: int, lora_params: int, dtype: str = "bf16", encoder_dtype: str = "bf16", lora_dtype: str = "fp32",
    compute_dtype: str = "bf16", gradient_checkpointing: bool = True,
) -> Estimate:
    """Floor of the memory one training step needs: frozen weights, the LoRA with its gradient and
    AdamW states, and the activations the backward pass keeps."""
    act = DTYPE_BYTES[compute_dtype]
    tokens = sequence_tokens(size, height, width, refs, condition_size, prompt_tokens, phrase_tokens)
    per_block = batch_size * tokens * size.width * act
    kept = size.blocks * per_block + TRAIN_LIVE * per_block if gradient_checkpointing else size.blocks * TRAIN_LIVE * per_block
    lora = lora_params * (2 * DTYPE_BYTES[lora_dtype] + ADAMW_BYTES)
    weights = size.transformer_params * DTYPE_BYTES[dtype] + (size.t5_params + size.other_params) * DTYPE_BYTES[encoder_dtype]
    return Estimate(weights + lora, float(kept))


# -- what the machine has free ---------------------------------------------------------------------


def _meminfo() -> int | None:
    """MemAvailable + SwapFree from /proc/meminfo (Linux without psutil)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree") if k in fields) or None
    except (OSError, ValueError):
        return None


def _cgroup_room() -> int | None:
    """What the process's cgroup still allows (v2 ``memory.max``, else v1), if it sets a limit."""
    for limit, used in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            text = Path("/sys/fs/cgroup", limit).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:  # v1 says "no limit" with a huge number
                return None
            return max(0, int(text) - int(Path("/sys/fs/cgroup", used).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def host_free_bytes() -> int | None:
    """RAM a new allocation can get: available memory plus free swap (swap makes a run slow, not
    impossible), within the cgroup's limit. None when the platform does not say."""
    try:
        import psutil

        free: int | None = int(psutil.virtual_memory().available + psutil.swap_memory().free)
    except (ImportError, OSError, RuntimeError):
        free = _meminfo()
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            free = None
    room = _cgroup_room()
    if room is not None:
        free = room if free is None else min(free, room)
    return free


def free_bytes(device: str) -> int | None:
    """Free memory of ``device`` (``cpu``, ``cuda``, ``cuda:N``); None when it cannot be read."""
    if device.split(":")[0] != "cuda":
        return host_free_bytes()
    import torch

    try:
        free, _ = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, AssertionError):  # no driver, or a device index that is not there
        return None
    return int(free)


def check_fits(estimate: Estimate, device: str, what: str, cure: str, *, host_cure: str | None = None,
               free: Callable[[str], int | None] | None = None) -> None:
    """Refuse, in one line, a run whose floor estimate exceeds ``REFUSE_RATIO`` x the free memory
    of ``device`` (and, under offload, of the host). ``free`` defaults to :func:`free_bytes`."""
    free = free or free_bytes
    have = free(device)
    if have is not None and estimate.total > REFUSE_RATIO * have:
        raise MusarError(
            f"{what} needs ~{gib(estimate.total)} GiB on {device} ({gib(estimate.weights)} GiB weights + "
            f"{gib(estimate.activations)} GiB activations), {gib(have)} GiB free; {cure}"
        )
    if estimate.host and device.split(":")[0] == "cuda":
        ram = free("cpu")
        if ram is not None and estimate.host > REFUSE_RATIO * ram:
            raise MusarError(f"{what} keeps ~{gib(estimate.host)} GiB of offloaded weights in RAM, "
                             f"{gib(ram)} GiB free; {host_cure or cure}")


def vae_params(config: Mapping[str, Any] | None) -> int:
    """A rough parameter count of a diffusers ``AutoencoderKL`` (3x3 convs of its ResNet blocks,
    encoder and decoder, and the mid blocks); FLUX's VAE: ~76e6 of its 84e6. Small beside the rest."""
    if not config:
        return 0
    channels = [int(c) for c in config.get("block_out_channels") or () if isinstance(c, int)]
    per_block = int(config.get("layers_per_block") or 2)
    if not channels:
        return 0
    return sum(18 * c * c * (2 * per_block + 1) for c in channels) + 2 * 40 * max(channels) ** 2
