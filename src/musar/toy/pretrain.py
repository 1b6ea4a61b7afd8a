"""Text-to-image pretraining of the toy base on world scenes (issue 8, item 2).

Rectified flow exactly as ``musar train`` uses it (the objective functions of
:mod:`musar.train.objective`: logit-normal timesteps with FLUX's resolution shift, ``x_t = (1-t)
x_0 + t eps``, velocity target, MSE), but here *every* weight trains: the transformer and both
text encoders, from random initialisation. The data are captioned scenes of one or two subjects
(a share of two-subject scenes repeat a shape), training identities only, so held-out test
identities stay unseen by the base as well as by MUSAR.

The scene pool is rendered once up front (rendering is ~0.3 ms a scene; the step is the cost).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from musar.pipeline import MusarPipeline
from musar.toy import world
from musar.toy.model import build_toy_pipeline, parameter_counts
from musar.train.config import ObjectiveConfig
from musar.train.objective import flow_loss, interpolate, sample_timesteps, velocity_target
from musar.transformer import latent_image_ids


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05  # cosine decay floor
    scenes: int = 12000  # size of the rendered pool
    max_objects: int = 2
    same_category_prob: float = 0.3
    seed: int = 0
    threads: int = 1  # on shared CPUs, two threads ran 8x *slower* per step than one
    log_every: int = 50
    text_length: int = 32  # T5 tokens of a caption (captions are <= ~30 words)
    long_text_every: int = 5  # every k-th step pads to long_text_length, as MUSAR's diptych prompts are
    long_text_length: int = 64


def render_pool(n: int, cfg: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, 64, 64) pixels in [-1, 1] and their captions, from training identities only."""
    scenes = world.make_multi_scenes(
        n, cfg.seed, max_objects=cfg.max_objects, split="train", same_category_prob=cfg.same_category_prob
    )
    pixels = np.stack([world.render_array(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [world.caption(s) for s in scenes]


def encode_text(pipe: MusarPipeline, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 sequence and CLIP pooled vector, tokenized exactly as FluxPipeline.encode_prompt does
    (padded to the tokenizer's length, no attention mask), but *with* gradients."""
    t5_ids = pipe.tokenizer_2(
        prompts, padding="max_length", max_length=length, truncation=True,
        return_tensors="pt",
    ).input_ids
    clip_ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    seq = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    return seq, pooled


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(
    cfg: PretrainConfig, out: str | Path, log: Callable[[str], None] = print
) -> tuple[MusarPipeline, dict[str, object]]:
    """Train a toy base from scratch and save it as a plain FLUX folder under ``out``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg, Path(out), log)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg: PretrainConfig, out: Path, log: Callable[[str], None]) -> tuple[MusarPipeline, dict[str, object]]:
    t0 = time.perf_counter()
    pipe = build_toy_pipeline(cfg.seed)
    pixels, captions = render_pool(cfg.scenes, cfg)
    log(f"pretrain: {len(captions)} scenes rendered in {time.perf_counter() - t0:.1f}s; params {parameter_counts(pipe)}")
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    objective = ObjectiveConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    vae = pipe.vae
    with torch.no_grad():  # the codec is fixed: encode the whole pool once
        lat = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        b, ch, h, w = lat.shape
        packed = pipe._pack_latents(lat, b, ch, h, w)
    img_ids = latent_image_ids(h // 2, w // 2, "cpu", torch.float32)
    history: list[float] = []
    window: list[float] = []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(captions), (cfg.batch_size,), generator=gen)
        x0 = packed[idx]
        # Text is padded without a mask, FLUX-style, so the pad count is part of the input: show the
        # model the longer padding MUSAR fine-tuning will use, too.
        length = cfg.long_text_length if cfg.long_text_every and step % cfg.long_text_every == 0 else cfg.text_length
        seq, pooled = encode_text(pipe, [captions[i] for i in idx.tolist()], length)
        t = sample_timesteps(cfg.batch_size, x0.shape[1], objective, gen, "cpu")
        eps = torch.randn(x0.shape, generator=gen)
        pred = pipe.transformer(
            hidden_states=interpolate(x0, eps, t), encoder_hidden_states=seq, pooled_projections=pooled,
            timestep=t, img_ids=img_ids, txt_ids=torch.zeros(seq.shape[1], 3), return_dict=False,
        )[0]
        loss = flow_loss(pred, velocity_target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean = sum(window) / len(window)
            history.append(mean)
            window = []
            rate = (step + 1) / (time.perf_counter() - t0)
            log(f"pretrain step {step + 1}/{cfg.steps} loss {mean:.4f} lr {sched.get_last_lr()[0]:.2e} ({rate:.2f} it/s)")
    for m in modules:
        m.eval().requires_grad_(False)
    base = out / "base"
    pipe.save_pretrained(base)
    info = {"config": asdict(cfg), "wall_s": round(time.perf_counter() - t0, 1), "loss_history": history,
            "params": parameter_counts(pipe)}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    log(f"pretrain: saved {base} after {info['wall_s']}s")
    return pipe, info
