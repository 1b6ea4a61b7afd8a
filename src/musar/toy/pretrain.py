"""Text-to-image pretraining of the toy base on world scenes (issue 8 item 2, issue 14).

Two phases on rendered pools (:mod:`musar.toy.pools`): first the codec
(:func:`musar.toy.codec.train_codec`), then the flow model in the frozen codec's latent space,
with exactly the objective ``musar train`` uses (:mod:`musar.train.objective`: logit-normal
timesteps with FLUX's resolution shift, ``x_t = (1-t) x_0 + t eps``, velocity target, MSE). Here
the transformer and the text encoder train from random initialisation. On top of the flow loss:

* **grounding** (``grounding_weight``, :mod:`musar.toy.grounding`): on two-subject samples, noise
  tokens must attend to their own subject's phrase. The toy's stand-in for what FLUX learns
  from scale; base pretraining only.
* **two-panel batches** (``diptych_every``): 128x64 images with the paper's template prompt,
  half of them showing *one* identity in both panels with the right one named 'the same
  <shape>' (the in-context identity prior FLUX has, :func:`musar.toy.pools.diptych_pool`).
* **pooled path** (``pooled``): 'clip' trains the tiny CLIP whose pooled vector modulates every
  token; 'frozen' keeps that CLIP at its random initialisation (a fixed, coarse global code of the
  caption that the transformer may read but cannot shape into a per-attribute channel); 'off'
  zeroes and freezes the projection that reads it, so the caption reaches the image only through
  attention.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers.training_utils import EMAModel
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from musar.models.transformer import latent_image_ids
from musar.pipelines.pipeline_musar import MusarPipeline
from musar.toy import pretrain_state
from musar.toy.codec import CodecTrainConfig, ToyCodec, train_codec
from musar.toy.grounding import grounding_loss
from musar.toy.model import build_toy_pipeline, parameter_counts
from musar.toy.pools import Pool, diptych_pool, scene_pool
from musar.toy.sampling import AffinityTap, install_tap, remove_tap
from musar.toy.text import freeze_text, mlm_pretrain
from musar.train.config import ObjectiveConfig
from musar.train.loop import StopSignals, TrainingInterrupted
from musar.train.objective import flow_loss, interpolate, sample_timesteps, velocity_target
from musar.utils import run_lock
from musar.utils.io import atomic_folder, atomic_write_json


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
    diptychs: int = 3000  # size of the rendered two-panel pool
    diptych_every: int = 4  # every k-th step is a batch of 128x64 two-panel images (0: never)
    same_identity_prob: float = 0.5  # share of two-panel images showing one identity twice
    grounding_weight: float = 0.0  # weight of the grounding term (0: off)
    grounding_background: bool = False  # the background phrase competes too (every scene takes part)
    pooled: Literal["clip", "frozen", "off"] = "clip"
    text_mlm_steps: int = 0  # masked-word pretraining of the T5 on the pools' texts first (musar.toy.text)
    text_train: Literal["all", "layers", "none"] = "all"  # what of the T5 trains with the base
    ema_decay: float = 0.0  # exponential moving average of the weights, saved and probed (0: off)
    checkpoint_every: int = 500  # base steps between resume checkpoints (musar.toy.pretrain_state; 0: none)


def _encode_pool(pipe: MusarPipeline, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed, scaled latents of a pool (the codec is frozen: encode once) and their position ids."""
    with torch.no_grad():
        packed = torch.cat([pipe.encode_image_latents(chunk) for chunk in pixels.split(512)])
    px = 2 * pipe.vae_scale_factor  # pixels per token side
    return packed, latent_image_ids(pixels.shape[-2] // px, pixels.shape[-1] // px, "cpu", torch.float32)


def encode_text(pipe: MusarPipeline, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 sequence and CLIP pooled vector, tokenized exactly as FluxPipeline.encode_prompt does
    (padded to the tokenizer's length, no attention mask), but *with* gradients."""
    t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    clip_ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    seq = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    return seq, pooled


def lr_schedule(opt: torch.optim.Optimizer, cfg: PretrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup ``step / warmup`` (step 0 runs at lr 0), then cosine decay to ``min_lr_ratio``."""
    return get_cosine_with_min_lr_schedule_with_warmup(opt, cfg.warmup, cfg.steps, min_lr_rate=cfg.min_lr_ratio)


def weight_average(params: list[torch.nn.Parameter], cfg: PretrainConfig) -> EMAModel | None:
    """The EMA of ``params`` (None when ``ema_decay`` is 0): its first ``warmup`` updates copy the
    weights, every later one decays by exactly ``ema_decay`` (min_decay = decay: no ramp)."""
    if cfg.ema_decay <= 0:
        return None
    return EMAModel(params, decay=cfg.ema_decay, min_decay=cfg.ema_decay, update_after_step=cfg.warmup - 1, foreach=True)


def trainable_parameters(pipe: MusarPipeline, cfg: PretrainConfig) -> list[torch.nn.Parameter]:
    """Set up which weights train (see the module docstring) and return them."""
    modules = [pipe.transformer, pipe.text_encoder_2] + ([pipe.text_encoder] if cfg.pooled == "clip" else [])
    for m in modules:
        m.train().requires_grad_(True)
    freeze_text(pipe.text_encoder_2, cfg.text_train)
    if cfg.pooled != "clip":
        pipe.text_encoder.eval().requires_grad_(False)
    if cfg.pooled == "off":
        proj = pipe.transformer.time_text_embed.text_embedder.linear_1
        torch.nn.init.zeros_(proj.weight)
        proj.weight.requires_grad_(False)
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def pretrain(
    cfg: PretrainConfig, out: str | Path, log: Callable[[str], None] = print,
    callback: Callable[[int, MusarPipeline], dict[str, object] | None] | None = None, callback_every: int = 0,
    force: bool = False,
) -> tuple[MusarPipeline, dict[str, object]]:
    """Train a toy base from scratch and save it as a plain FLUX folder under ``out``.

    A pretraining stopped after its codec and text phases resumes from its newest checkpoint
    (:mod:`musar.toy.pretrain_state`) unless ``force``. ``callback(step, pipe)`` runs every
    ``callback_every`` steps (models in eval mode, no grad); what it returns is kept in
    ``pretrain.json`` under 'probes'.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        # One pretraining per folder: a second would interleave its checkpoints with this one's.
        with run_lock.hold(pretrain_state.state_dir(out), "toy pretraining"):
            if force:
                pretrain_state.clear(out)
            return _pretrain(cfg, Path(out), log, callback, callback_every)
    finally:
        torch.set_num_threads(threads)


def _pretrain(
    cfg: PretrainConfig, out: Path, log: Callable[[str], None],
    callback: Callable[[int, MusarPipeline], dict[str, object] | None] | None, callback_every: int,
) -> tuple[MusarPipeline, dict[str, object]]:
    t0 = time.perf_counter()
    resume = pretrain_state.find(out, cfg)  # before anything slow: a changed recipe fails at once
    pipe = build_toy_pipeline(cfg.seed)
    tok = pipe.tokenizer_2
    scenes = scene_pool(cfg.scenes, cfg.seed, tok, cfg.long_text_length, cfg.max_objects, cfg.same_category_prob,
                        cfg.brief_prob, cfg.grounding_background)
    log(f"pretrain: {len(scenes.prompts)} scenes rendered in {time.perf_counter() - t0:.1f}s; params {parameter_counts(pipe)}")
    if cfg.diptych_every and cfg.diptychs:
        dip = diptych_pool(cfg.diptychs, cfg.seed, tok, cfg.long_text_length, cfg.brief_prob, cfg.same_identity_prob,
                           cfg.grounding_background)
    loop = pretrain_state.LoopState()
    if resume is not None:  # codec and text phases are in the checkpoint's weights
        pretrain_state.load_models(resume, pipe)
        log(f"pretrain: resuming from {resume}")
    else:
        if cfg.codec_from:
            pipe.vae = ToyCodec.from_pretrained(Path(cfg.codec_from) / "vae")
            loop.codec_info = {"reused": str(cfg.codec_from)}
        else:
            loop.codec_info = dict(train_codec(pipe.vae, scenes.pixels, cfg.codec, log))
        log(f"pretrain: codec {loop.codec_info}")
        if cfg.text_mlm_steps:
            texts = scenes.prompts + (dip.prompts if cfg.diptych_every and cfg.diptychs else [])
            loop.text_info = mlm_pretrain(pipe.text_encoder_2, tok, texts, cfg.text_mlm_steps,
                                          (cfg.text_length, cfg.long_text_length), seed=cfg.seed, log=log)
            log(f"pretrain: text {loop.text_info}")
    params = trainable_parameters(pipe, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4, betas=(0.9, 0.99))
    sched = lr_schedule(opt, cfg)
    objective = ObjectiveConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    pools: list[tuple[Pool, torch.Tensor, torch.Tensor]] = [(scenes, *_encode_pool(pipe, scenes.pixels))]
    if cfg.diptych_every and cfg.diptychs:
        pools.append((dip, *_encode_pool(pipe, dip.pixels)))
    ema = weight_average(params, cfg)
    if resume is not None:
        loop = pretrain_state.restore(resume, opt, sched, ema, gen)
    start, wall_before = loop.step, loop.wall_s
    t_call = time.perf_counter()

    def save() -> Path:
        loop.wall_s = round(wall_before + time.perf_counter() - t0, 1)
        return pretrain_state.save(out, cfg, pipe, opt, sched, ema, gen, loop)

    if cfg.checkpoint_every and resume is None:
        save()  # the codec and text phases are kept even if the loop is stopped early
    tap = AffinityTap(grad=True)
    if cfg.grounding_weight > 0:
        install_tap(pipe.transformer, tap)
    with StopSignals("musar toy pretrain") as stop:
        for step in range(start, cfg.steps):
            diptych = len(pools) > 1 and step % cfg.diptych_every == cfg.diptych_every - 1
            pool, latents, img_ids = pools[1 if diptych else 0]
            idx = torch.randint(0, len(pool.prompts), (cfg.batch_size,), generator=gen)
            x0 = latents[idx]
            # Text is padded without a mask, FLUX-style, so the pad count is part of the input: show
            # the model the longer padding MUSAR fine-tuning and generation use, too.
            long = diptych or (cfg.long_text_every and step % cfg.long_text_every == 0)
            seq, pooled = encode_text(pipe, [pool.prompts[i] for i in idx.tolist()],
                                      cfg.long_text_length if long else cfg.text_length)
            targets = pool.targets.take(idx)
            tap.records = {}
            tap.enabled = cfg.grounding_weight > 0 and bool(targets.valid.any())
            tap.spans = targets.spans
            t = sample_timesteps(cfg.batch_size, x0.shape[1], objective, gen, "cpu")
            eps = torch.randn(x0.shape, generator=gen)
            pred = pipe.transformer(
                hidden_states=interpolate(x0, eps, t), encoder_hidden_states=seq, pooled_projections=pooled,
                timestep=t, img_ids=img_ids, txt_ids=torch.zeros(seq.shape[1], 3), return_dict=False,
            )[0]
            loss = flow_loss(pred, velocity_target(x0, eps))
            loop.window["flow"].append(float(loss.detach()))
            ground = grounding_loss(list(tap.records.values()), targets) if tap.enabled else None
            if ground is not None:
                loss = loss + cfg.grounding_weight * ground
                loop.window["grounding"].append(float(ground.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if ema is not None:
                ema.step(params)
            loop.step = step + 1
            if loop.step % cfg.log_every == 0 or loop.step == cfg.steps:
                means = {k: sum(v) / len(v) for k, v in loop.window.items() if v}
                loop.history.append({"step": loop.step, **means})
                loop.window = {k: [] for k in loop.window}
                rate = (loop.step - start) / (time.perf_counter() - t_call)
                terms = " ".join(f"{k} {v:.4f}" for k, v in means.items())
                log(f"pretrain step {loop.step}/{cfg.steps} {terms} lr {sched.get_last_lr()[0]:.2e} ({rate:.2f} it/s)")
            if callback is not None and callback_every and (loop.step % callback_every == 0 or loop.step == cfg.steps):
                with _averaged(ema, params):
                    loop.probes.append({"step": loop.step, **(_probe(pipe, callback, loop.step) or {})})
                if cfg.grounding_weight > 0:  # a probe may have swapped the attention processors
                    install_tap(pipe.transformer, tap)
            due = cfg.checkpoint_every and loop.step % cfg.checkpoint_every == 0 and loop.step < cfg.steps
            if due or stop.signum is not None:
                path = save()
                if stop.signum is not None:
                    raise TrainingInterrupted(stop.signum, path)
    if ema is not None:
        ema.copy_to(params)  # the averaged weights are the ones saved
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    remove_tap(pipe.transformer)
    base = atomic_folder(out / "base", pipe.save_pretrained)  # the chain takes a base that exists as finished
    info = {"config": asdict(cfg), "wall_s": round(wall_before + time.perf_counter() - t0, 1),
            "loss_history": loop.history, "codec": loop.codec_info, "text": loop.text_info,
            "params": parameter_counts(pipe), "probes": loop.probes, "resumed_from_step": start}
    atomic_write_json(out / "pretrain.json", info)
    pretrain_state.clear(out)
    log(f"pretrain: saved {base} after {info['wall_s']}s")
    return pipe, info


@contextmanager
def _averaged(ema: EMAModel | None, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The averaged weights in place of the live ones for the duration of the block."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def _probe(
    pipe: MusarPipeline, callback: Callable[[int, MusarPipeline], dict[str, object] | None], step: int
) -> dict[str, object] | None:
    modules = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
    modes = [m.training for m in modules]
    remove_tap(pipe.transformer)
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            return callback(step, pipe)
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def load_pretrain_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """A :class:`PretrainConfig` from YAML (``configs/toy_base.yaml``) plus ``key=value`` overrides,
    every key checked as ``musar train`` checks its own."""
    import yaml

    from musar.errors import MusarError
    from musar.train.config import apply_override, from_dict

    data: dict[str, object] = {}
    if path is not None:
        if not Path(path).is_file():
            raise MusarError(f"config file not found: {path}")
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(PretrainConfig, data)
