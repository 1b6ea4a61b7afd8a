"""The inputs of :meth:`MusarTransformer.forward <musar.models.transformer.MusarTransformer.forward>`
beyond FLUX's own: the reference conditions (:class:`ConditionInputs`), the position ids of the
target and condition latents, and MUSAR's inputs arriving through ``joint_attention_kwargs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from musar.errors import MusarError


@dataclass
class ConditionInputs:
    """The c reference conditions of one batch (every sample has the same c)."""

    image_latents: Sequence[torch.Tensor]  # c x (B, n'_k, in_channels), packed like FLUX latents
    text_embeds: Sequence[torch.Tensor]  # c x (B, m'_k, joint_attention_dim): T5 output of phrase k
    image_ids: Sequence[torch.Tensor]  # c x (n'_k, 3) position ids, see condition_image_ids
    spans: torch.Tensor | None = None  # (B, c, 2): (start, length) of phrase k in the main prompt
    timestep: float = 0.0  # t_cond: condition rows are modulated with temb(t_cond)
    # (B, n, c) bool: the conditions each NOISE token may be routed to (given routes,
    # docs/design.md sec. 4a; musar.models.boxes builds them from boxes). None = S* decides among all.
    candidates: torch.Tensor | None = None

    def __post_init__(self) -> None:
        c = len(self.image_latents)
        if not (len(self.text_embeds) == len(self.image_ids) == c):
            raise ValueError("conditions need as many text embeddings and id grids as image latents")
        if self.spans is not None and self.spans.shape[1] != c:
            raise ValueError(f"spans describe {self.spans.shape[1]} subjects for {c} conditions")
        cand = self.candidates
        if cand is not None and (cand.dim() != 3 or cand.shape[2] != c or cand.dtype != torch.bool):
            raise ValueError(f"route candidates must be (B, n, {c}) booleans, got {cand.dtype} {tuple(cand.shape)}")

    @property
    def num(self) -> int:
        return len(self.image_latents)


def check_candidates(candidates: torch.Tensor | None, batch: int, noise: int) -> None:
    """Route candidates must cover every NOISE token of every sample."""
    if candidates is not None and tuple(candidates.shape[:2]) != (batch, noise):
        raise ValueError(
            f"route candidates cover {tuple(candidates.shape[:2])} (batch, noise tokens); the forward has ({batch}, {noise})"
        )


def latent_image_ids(height_tokens: int, width_tokens: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's (h*w, 3) position ids of a packed latent grid (axis 0 unused, 1 = row, 2 = column)."""
    # As FluxPipeline._prepare_latent_image_ids builds it (float32, then cast), without importing
    # diffusers' pipeline layer into models/.
    ids = torch.zeros(height_tokens, width_tokens, 3)
    ids[..., 1] += torch.arange(height_tokens)[:, None]
    ids[..., 2] += torch.arange(width_tokens)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def condition_image_ids(
    index: int, height_tokens: int, width_tokens: int, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Ids of reference ``index``: the target's grid shifted left by (index + 1) condition widths.

    OminiControl/XVerse lineage (docs/design.md sec. 2): conditions sit side by side to the left of the
    target in RoPE space, so they never share positions with it or with each other.
    """
    ids = latent_image_ids(height_tokens, width_tokens, device, dtype)
    ids[:, 2] -= (index + 1) * width_tokens
    return ids


# MusarTransformer.forward's own inputs, which may also arrive inside ``joint_attention_kwargs``
# (the only per-call channel that diffusers' pipelines and training scripts pass through).
MUSAR_FORWARD_KWARGS = ("conditions", "routing", "step_index", "capture", "condition_cache")


def split_joint_attention_kwargs(
    joint_attention_kwargs: Mapping[str, Any] | None, explicit: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    """``(lora scale, MUSAR inputs)`` from diffusers' ``joint_attention_kwargs`` and the forward's
    explicit MUSAR arguments (``None`` = not given).

    The mapping is only read, never changed: ``FluxPipeline`` passes the same dict every step.
    A MUSAR input given both ways is refused rather than silently picked from one side.
    """
    extra = dict(joint_attention_kwargs or {})
    scale = extra.pop("scale", None)
    unknown = sorted(set(extra) - set(MUSAR_FORWARD_KWARGS))
    if unknown:
        raise MusarError(
            f"joint_attention_kwargs {unknown} are not supported by MusarTransformer "
            f"(it takes 'scale' and MUSAR's inputs {list(MUSAR_FORWARD_KWARGS)})"
        )
    both = [k for k in extra if explicit.get(k) is not None]
    if both:
        raise MusarError(f"{both} given both as arguments and in joint_attention_kwargs; pass each once")
    inputs = {**explicit, **extra}
    return (1.0 if scale is None else float(scale)), inputs
