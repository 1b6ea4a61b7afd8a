"""Builders for tiny transformer inputs shared by the model tests."""

from __future__ import annotations

import torch

from musar.models.transformer import ConditionInputs, MusarTransformer, condition_image_ids, latent_image_ids


def make_inputs(
    model: MusarTransformer,
    *,
    batch: int = 1,
    grid: tuple[int, int] = (4, 4),
    prompt_len: int = 8,
    num_conditions: int = 0,
    cond_grid: tuple[int, int] = (2, 2),
    cond_text_len: int = 3,
    spans: list[list[tuple[int, int]]] | None = None,
    seed: int = 0,
) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    kwargs = {
        "hidden_states": torch.randn(batch, n, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, prompt_len, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), 0.7),
        "img_ids": latent_image_ids(*grid, "cpu", torch.float32),
        "txt_ids": torch.zeros(prompt_len, 3),
    }
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5)
    if num_conditions:
        nc = cond_grid[0] * cond_grid[1]
        if spans is None:
            spans = [[(1 + 2 * k, 2) for k in range(num_conditions)]] * batch
        kwargs["conditions"] = ConditionInputs(
            image_latents=[
                torch.randn(batch, nc, cfg.in_channels, generator=g) for _ in range(num_conditions)
            ],
            text_embeds=[
                torch.randn(batch, cond_text_len, cfg.joint_attention_dim, generator=g)
                for _ in range(num_conditions)
            ],
            image_ids=[
                condition_image_ids(k, *cond_grid, "cpu", torch.float32) for k in range(num_conditions)
            ],
            spans=torch.tensor(spans, dtype=torch.long),
        )
    return kwargs
