"""The training objective (docs/design.md sec. 7) as pure, separately testable functions.

Rectified flow exactly as FLUX is trained:

* ``x_t = (1 - t) * x_0 + t * eps`` with ``t`` in (0, 1), ``t = 1`` pure noise (the same ``t`` the
  transformer receives as ``timestep``; the pipeline passes ``sigma`` the same way);
* the transformer predicts the velocity ``v = eps - x_0``; the loss is the MSE on the NOISE tokens
  only (``MusarTransformer`` returns only those rows: condition tokens never enter the loss);
* ``t = sigmoid(N(logit_mean, logit_std))`` (logit-normal, SD3/FLUX), then FLUX's
  resolution-dependent shift ``t' = e^mu / (e^mu + (1/t - 1))`` with ``mu = calculate_shift(n)``
  for ``n`` noise tokens, the same ``mu`` the FLUX scheduler uses at inference;
* FLUX.1-dev is guidance-distilled, so its guidance embedding needs a value during training too:
  a constant (``objective.guidance``, default 1.0 as in OminiControl, which MUSAR builds on;
  inference then uses the usual 3.5).

The batch reaches these functions encoded (:mod:`musar.train.encoding`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from musar.models.options import RoutingOptions
from musar.train.config import ObjectiveConfig
from musar.train.encoding import EncodedBatch, routing_for


def shift_mu(num_tokens: int, cfg: ObjectiveConfig) -> float:
    """FLUX's ``mu`` for ``num_tokens`` packed noise tokens (linear in the token count)."""
    return float(calculate_shift(num_tokens, cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift, cfg.max_shift))


def time_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """``e^mu / (e^mu + (1/t - 1))``: FLUX's exponential time shift (sigma = 1)."""
    e = math.exp(mu)
    return e / (e + (1.0 / t - 1.0))


def sample_timesteps(
    batch: int, num_tokens: int, cfg: ObjectiveConfig, generator: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """(B,) float32 timesteps in (0, 1): logit-normal, then shifted for the resolution."""
    u = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
    t = torch.sigmoid(u * cfg.logit_std + cfg.logit_mean)
    if cfg.shift:
        t = time_shift(t, shift_mu(num_tokens, cfg))
    # Float32 sigmoid reaches exactly 0 or 1 for |u| > ~17 sigma-units; keep t strictly inside.
    return t.clamp(1e-5, 1.0 - 1e-5)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` with per-sample ``t`` broadcast over tokens and channels."""
    tb = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - tb) * x0 + tb * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (bf16 MSE over millions of elements loses precision)."""
    return F.mse_loss(pred.float(), target.float())


def flow_step_loss(
    transformer: Any,
    enc: EncodedBatch,
    t: torch.Tensor,
    eps: torch.Tensor,
    *,
    guidance: float | None,
    routing: RoutingOptions,
) -> torch.Tensor:
    """One forward of the rectified-flow objective; returns the scalar loss (float32)."""
    x_t = interpolate(enc.latents, eps, t)
    b = x_t.shape[0]
    g = None if guidance is None else torch.full((b,), guidance, device=x_t.device, dtype=torch.float32)
    pred = transformer(
        hidden_states=x_t,
        encoder_hidden_states=enc.prompt_embeds,
        pooled_projections=enc.pooled,
        timestep=t.to(x_t.dtype),
        img_ids=enc.latent_ids,
        txt_ids=enc.text_ids,
        guidance=g,
        conditions=enc.conditions,
        routing=routing_for(enc, routing),
        return_dict=False,
    )[0]
    return flow_loss(pred, velocity_target(enc.latents, eps))


def draw_noise(enc: EncodedBatch, cfg: ObjectiveConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, eps) for a batch from one generator: the step's randomness is a pure function of its seed."""
    t = sample_timesteps(enc.latents.shape[0], enc.num_tokens, cfg, generator, enc.latents.device)
    eps = torch.randn(enc.latents.shape, generator=generator, device=enc.latents.device, dtype=torch.float32)
    return t, eps.to(enc.latents.dtype)
