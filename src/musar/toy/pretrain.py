"""Text-to-image pretraining of the toy base on world scenes (issue 8, item 2).

Two phases on one rendered pool of scenes: first the codec (:func:`musar.toy.codec.train_codec`,
a few CPU minutes), then the flow model in the frozen codec's latent space. Rectified flow exactly as ``musar train`` uses it (the objective functions of
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from musar.data.samples import another_phrase, diptych_prompt
from musar.models.transformer import latent_image_ids
from musar.pipelines.pipeline_musar import MusarPipeline
from musar.toy import world
from musar.toy.codec import CodecTrainConfig, ToyCodec, train_codec
from musar.toy.model import build_toy_pipeline, parameter_counts
from musar.train.config import ObjectiveConfig
from musar.train.objective import flow_loss, interpolate, sample_timesteps, velocity_target


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05  # cosine decay floor
    scenes: int = 12000  # size of the rendered pool
    max_objects: int = 2
    same_category_prob: float = 0.3
    seed: int = 0
    threads: int = 2  # 0.42 s/step with 2 threads, 0.60 with 1, on an idle 2-core machine
    log_every: int = 100
    codec: CodecTrainConfig = field(default_factory=CodecTrainConfig)
    codec_from: str | None = None  # a trained toy base folder whose codec to reuse instead of training one
    text_length: int = 32  # T5 tokens of a caption (captions are <= ~30 words)
    long_text_every: int = 5  # every k-th step pads to long_text_length, as MUSAR's diptych prompts are
    long_text_length: int = 64
    brief_prob: float = 0.5  # share of subjects a caption names by category only ("a star")
    diptychs: int = 3000  # size of the rendered diptych pool
    diptych_every: int = 4  # every k-th step is a batch of 128x64 diptychs (0: never)


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    pixels = np.stack(arrays).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def _brief_flags(rng: np.random.Generator, n: int, p: float) -> list[bool]:
    return [bool(f) for f in rng.random(n) < p]


def render_pool(n: int, cfg: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, 64, 64) pixels in [-1, 1] and their captions, from training identities only.

    Each subject is named in full or, with ``cfg.brief_prob``, by its category only, so the base
    also knows what 'a star' means without a colour, the phrase MUSAR's toy prompts use.
    """
    scenes = world.make_multi_scenes(
        n, cfg.seed, max_objects=cfg.max_objects, split="train", same_category_prob=cfg.same_category_prob
    )
    rng = np.random.default_rng(cfg.seed + 101)
    captions = [world.caption(s, _brief_flags(rng, len(s.placements), cfg.brief_prob)) for s in scenes]
    return _to_tensor([world.render_array(s) for s in scenes]), captions


def render_diptychs(n: int, cfg: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, 64, 128) two-column images and their template prompts (training identities only).

    FLUX can draw the diptychs of the paper's Fig. 2 from the template prompt alone (Subjects200K
    was made that way), and MUSAR's stages 2-3 fine-tune at that 2:1 shape. A base that never
    saw it would have to learn the shape inside the LoRA. Tried here: MUSAR training then wrecked
    the square outputs. So the toy base sees such diptychs too, built the way
    :func:`musar.data.samples.make_diptych` builds them.
    """
    specs = world.make_pair_specs(2 * n, cfg.seed + 7, split="train")
    rng = np.random.default_rng(cfg.seed + 202)
    arrays, prompts = [], []
    for a, b in zip(specs[0::2], specs[1::2], strict=True):
        brief_a, brief_b = _brief_flags(rng, 2, cfg.brief_prob)
        phrase_b = world.subject_phrase(b.identity, brief=brief_b)
        if a.identity.category == b.identity.category:
            phrase_b = another_phrase(phrase_b)
        prompts.append(diptych_prompt(
            world.subject_phrase(a.identity, brief=brief_a), world.caption(a.scenes[1], brief_a),
            phrase_b, world.caption(b.scenes[1], brief_b),
        ))
        arrays.append(np.concatenate([world.render_array(a.scenes[1]), world.render_array(b.scenes[1])], axis=1))
    return _to_tensor(arrays), prompts


@torch.no_grad()
def _encode_pool(pipe: MusarPipeline, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed, scaled latents of a pool (the codec is frozen: encode once) and their position ids."""
    vae = pipe.vae
    lat = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(512)])
    lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
    b, ch, h, w = lat.shape
    return pipe._pack_latents(lat, b, ch, h, w), latent_image_ids(h // 2, w // 2, "cpu", torch.float32)


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
    if cfg.codec_from:
        pipe.vae = ToyCodec.from_pretrained(Path(cfg.codec_from) / "vae")
        codec_info: dict[str, object] = {"reused": str(cfg.codec_from)}
    else:
        codec_info = dict(train_codec(pipe.vae, pixels, cfg.codec, log))
    log(f"pretrain: codec {codec_info}")
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    objective = ObjectiveConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    packed, img_ids = _encode_pool(pipe, pixels)
    pools = [(packed, img_ids, captions)]
    if cfg.diptych_every and cfg.diptychs:
        dip_pixels, dip_prompts = render_diptychs(cfg.diptychs, cfg)
        pools.append((*_encode_pool(pipe, dip_pixels), dip_prompts))
    history: list[float] = []
    window: list[float] = []
    for step in range(cfg.steps):
        diptych = len(pools) > 1 and step % cfg.diptych_every == cfg.diptych_every - 1
        latents, img_ids, texts = pools[1 if diptych else 0]
        idx = torch.randint(0, len(texts), (cfg.batch_size,), generator=gen)
        x0 = latents[idx]
        # Text is padded without a mask, FLUX-style, so the pad count is part of the input: show the
        # model the longer padding MUSAR fine-tuning will use, too.
        long = diptych or (cfg.long_text_every and step % cfg.long_text_every == 0)
        length = cfg.long_text_length if long else cfg.text_length
        seq, pooled = encode_text(pipe, [texts[i] for i in idx.tolist()], length)
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
            "codec": codec_info, "params": parameter_counts(pipe)}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    log(f"pretrain: saved {base} after {info['wall_s']}s")
    return pipe, info
