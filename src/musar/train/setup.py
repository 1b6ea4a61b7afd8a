"""Building a run: the frozen pipeline, the LoRA and what of it trains, optimizer, schedule, data.

Frozen: the base transformer, the VAE and both text encoders (``requires_grad`` off, eval mode).
Trained: the LoRA weights that receive gradients. In ``dual`` mode the *noise* branch of
text-stream layers (``context_embedder``, ``add_*_proj``, ``to_add_out``, ``ff_context``) never
sees a row (text rows are PROMPT, which gets no LoRA, or COND_TEXT, which gets the subject
branch), so it stays frozen at its initial value: it would otherwise only be moved by weight decay
and would make DDP wait for gradients that never come. It is still saved, so the file has every
key the pipeline expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from musar.data import BatchTransform, CurriculumStream, MusarGen, Subjects200K, make_loader
from musar.lora import BranchLoRALinear, inject_branch_lora, lora_named_parameters
from musar.lora.io import load_branch_lora
from musar.train.config import OptimConfig, TrainConfig, to_dict
from musar.train.distributed import make_accelerator
from musar.train.encoding import TextCache
from musar.train.tracking import trackers
from musar.utils.dtypes import torch_dtype

_BRANCHES_USED = {"image": {"noise", "subject"}, "text": {"subject"}, "joint": {"noise", "subject"}}
# Ours name only the shape after warmup; transformers' names (get_scheduler) say warmup and floor too.
_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine_with_min_lr", "linear": "polynomial"}


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int) -> LambdaLR:
    """transformers' LR schedule: ``lr * u / warmup_steps`` for the first ``warmup_steps`` updates
    (``u`` = updates applied so far), then ``lr``, or a cosine / linear decay to
    ``lr * min_lr_ratio`` reached at ``total_steps`` updates."""
    schedule, extra = optim.schedule, {}
    if schedule == "cosine":
        extra = {"min_lr_rate": optim.min_lr_ratio}
    elif schedule == "linear" and optim.min_lr_ratio < 1:
        extra = {"lr_end": optim.lr * optim.min_lr_ratio, "power": 1.0}
    elif schedule == "linear":
        # A linear decay to lr itself is constant; transformers' polynomial decay refuses lr_end >= lr.
        schedule = "constant"
    # The polynomial decay divides by (training - warmup) steps without a guard: a run whose warmup
    # lasts all of it would raise at its last update. The cosine guards it the same way (>= 1).
    steps = max(total_steps, optim.warmup_steps + 1)
    return get_scheduler(_SCHEDULES[schedule], optimizer, num_warmup_steps=optim.warmup_steps,
                         num_training_steps=steps, scheduler_specific_kwargs=extra)


def build_pipeline(cfg: TrainConfig) -> tuple[Any, torch.dtype]:
    """The frozen FLUX pipeline (tiny preset or pretrained) and its compute dtype."""
    if cfg.model.preset is not None:
        from musar.utils.registry import get_preset

        # the same base load_pipeline(preset=...) builds, without its default LoRA; fp32 on CPU
        return get_preset(cfg.model.preset).build(False), torch.float32
    from musar.pipelines.pipeline_musar import MusarPipeline

    dtype = torch_dtype(cfg.model.dtype)
    # Each component loads in its own dtype (the VAE and text encoders in encoder_dtype): a cast
    # after loading would lose the modules a model keeps in float32.
    pipe = MusarPipeline.from_pretrained(
        cfg.model.pretrained, dtype={"transformer": dtype, "default": torch_dtype(cfg.model.encoder_dtype)}
    )
    return pipe, dtype


def select_trainable(transformer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Freeze LoRA branches that no row of their layer uses; return the trainable (name, param)s."""
    for module in transformer.modules():
        if isinstance(module, BranchLoRALinear):
            for branch in module.lora_A:
                used = branch == "shared" or branch in _BRANCHES_USED[module.stream]
                module.lora_A[branch].weight.requires_grad_(used)
                module.lora_B[branch].weight.requires_grad_(used)
    return [(n, p) for n, p in lora_named_parameters(transformer) if p.requires_grad]


@dataclass
class Components:
    accelerator: Accelerator
    pipe: Any  # MusarPipeline
    transformer: nn.Module  # the plain MusarTransformer (shared with pipe)
    model: Any  # the same, as prepared by accelerate (DDP / FSDP / DeepSpeed wrapper)
    params: list[nn.Parameter]
    optimizer: Any
    scheduler: LambdaLR
    stream: CurriculumStream
    loader: torch.utils.data.DataLoader
    text_cache: TextCache
    compute_dtype: torch.dtype


def _ignore_signals(_: int) -> None:
    # DataLoader workers: leave Ctrl-C / SIGTERM to the main process, which checkpoints first.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_data(cfg: TrainConfig, acc: Accelerator) -> tuple[CurriculumStream, torch.utils.data.DataLoader]:
    d = cfg.data
    with acc.main_process_first():  # the first process downloads/prepares, the others reuse its cache
        source = None
        if d.source is not None:
            source = Subjects200K.open(d.source, quality_threshold=d.quality_threshold, padding=d.padding,
                                       collections=d.collections, limit=d.limit, cache_dir=d.cache_dir)
        musar_gen = MusarGen.open(d.musar_gen, limit=d.limit, cache_dir=d.cache_dir) if d.musar_gen else None
    stream = CurriculumStream(
        source, cfg.curriculum, batch_size=cfg.optim.batch_size, rank=acc.process_index,
        world_size=acc.num_processes, musar_gen=musar_gen, seed=cfg.seed, batches_per_step=cfg.optim.grad_accumulation,
    )
    loader = make_loader(stream, transform=BatchTransform(view_size=d.view_size, condition_size=d.condition_size),
                         num_workers=d.num_workers, pin_memory=acc.device.type == "cuda")
    loader.worker_init_fn = _ignore_signals
    return stream, loader


def build_components(cfg: TrainConfig, resume_dir: Path | None = None) -> Components:
    acc = make_accelerator(cfg, trackers(cfg.output_dir, cfg.report_to, to_dict(cfg)))
    if acc.device.type == "cpu" and cfg.model.cpu_threads:
        torch.set_num_threads(cfg.model.cpu_threads)
    set_seed(cfg.seed)  # LoRA init draws from the global RNG: identical on every rank
    pipe, dtype = build_pipeline(cfg)
    for frozen in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        frozen.requires_grad_(False)
        frozen.eval()
    transformer = pipe.transformer
    inject_branch_lora(transformer, cfg.lora)
    for _, p in lora_named_parameters(transformer):
        p.data = p.data.to(torch_dtype(cfg.model.lora_dtype))
    if resume_dir is not None:  # into the plain model, before any wrapper shards it
        load_branch_lora(transformer, resume_dir / "lora.safetensors")
    pipe.to(acc.device)
    if cfg.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = [p for _, p in select_trainable(transformer)]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    scheduler = build_scheduler(optimizer, o, cfg.total_steps)
    model, optimizer = acc.prepare(transformer, optimizer)
    stream, loader = build_data(cfg, acc)
    return Components(acc, pipe, transformer, model, params, optimizer, scheduler, stream, loader,
                      TextCache(cfg.data.text_cache_size), dtype)
