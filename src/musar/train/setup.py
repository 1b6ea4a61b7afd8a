"""Building a run (models, LoRA, optimizer, schedule, data) and saving / restoring its state.

Frozen: the base transformer, the VAE and both text encoders (``requires_grad`` off, eval mode).
Trained: the LoRA weights that receive gradients. In ``dual`` mode the *noise* branch of
text-stream layers (``context_embedder``, ``add_*_proj``, ``to_add_out``, ``ff_context``) never
sees a row (text rows are PROMPT, which gets no LoRA, or COND_TEXT, which gets the subject
branch), so it stays frozen at its initial value: it would otherwise only be moved by weight decay
and would make DDP wait for gradients that never come. It is still saved, so the file has every
key the pipeline expects.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn

from musar.data import BatchTransform, CurriculumStream, MusarGen, Subjects200K, make_loader
from musar.errors import MusarError
from musar.lora import BranchLoRALinear, inject_branch_lora, lora_named_parameters
from musar.lora.io import load_branch_lora
from musar.train import checkpoint as ckpt
from musar.train.config import OptimConfig, TrainConfig
from musar.train.distributed import load_optimizer, make_accelerator, save_lora, save_optimizer
from musar.train.fingerprint import RUN_CONFIG, RUN_FINGERPRINT, fingerprint, run_config
from musar.train.objective import TextCache
from musar.utils.dtypes import torch_dtype

CHECKPOINT_FORMAT = 1

_BRANCHES_USED = {"image": {"noise", "subject"}, "text": {"subject"}, "joint": {"noise", "subject"}}


def sdpa_context(kind: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Restrict SDPA to the configured kernels on CUDA (forward *and* backward/recompute).

    Must enclose the backward too: with gradient checkpointing, attention is recomputed there.
    """
    if device.type != "cuda" or kind == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash_efficient": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
    }[kind]
    return sdpa_kernel(backends)


def lr_lambda(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``optim.lr`` after ``u`` applied updates: linear warmup, then the schedule."""
    warmup, ratio = optim.warmup_steps, optim.min_lr_ratio

    def factor(u: int) -> float:
        if u < warmup:
            return (u + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (u - warmup) / max(1, total_steps - warmup))
        if optim.schedule == "cosine":
            return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return ratio + (1 - ratio) * (1 - progress)

    return factor


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
    scheduler: torch.optim.lr_scheduler.LambdaLR
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
    acc = make_accelerator(cfg)
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, cfg.total_steps))
    model, optimizer = acc.prepare(transformer, optimizer)
    stream, loader = build_data(cfg, acc)
    return Components(acc, pipe, transformer, model, params, optimizer, scheduler, stream, loader,
                      TextCache(cfg.data.text_cache_size), dtype)


def save_training_state(c: Components, cfg: TrainConfig, state: dict[str, Any], output_dir: Path, step: int) -> Path:
    """Write a complete checkpoint folder for ``step`` (collective: call on every process)."""
    acc = c.accelerator
    staging, final = ckpt.staging_dir(output_dir, step), ckpt.checkpoints_root(output_dir) / ckpt.checkpoint_name(step)
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    acc.wait_for_everyone()
    save_lora(acc, c.model, c.transformer, staging / "lora.safetensors", {"step": str(step)})
    save_optimizer(acc, c.model, c.optimizer, staging)
    save_rng(staging, acc.process_index)
    if acc.is_main_process:
        ckpt.write_json(staging / "scheduler.json", c.scheduler.state_dict())
        c.stream.position = step * cfg.optim.grad_accumulation
        config = run_config(cfg)
        ckpt.write_json(staging / ckpt.TRAINER_FILE, {
            **state, "format": CHECKPOINT_FORMAT, "data": c.stream.state_dict(), "world_size": acc.num_processes,
            "total_steps": cfg.total_steps, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            RUN_CONFIG: config, RUN_FINGERPRINT: fingerprint(config),
        })
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.commit(staging, final)
        ckpt.prune(output_dir, cfg.keep_last)
    acc.wait_for_everyone()
    return final


def load_training_state(c: Components, cfg: TrainConfig, directory: Path) -> dict[str, Any]:
    """Restore optimizer, scheduler, RNG and data position (the LoRA was loaded at build time)."""
    acc = c.accelerator
    raw = ckpt.read_json(directory / ckpt.TRAINER_FILE)
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise MusarError(f"checkpoint {directory} has format {raw.get('format')!r}; this version reads {CHECKPOINT_FORMAT}")
    load_optimizer(acc, c.model, c.optimizer, directory)
    c.scheduler.load_state_dict(ckpt.read_json(directory / "scheduler.json"))
    if raw.get("world_size") != acc.num_processes:
        import warnings

        warnings.warn(f"checkpoint was written by {raw.get('world_size')} processes, resuming with {acc.num_processes}: "
                      "the data order will differ from an uninterrupted run", stacklevel=2)
    elif not load_rng(directory, acc.process_index):
        raise MusarError(f"checkpoint {directory} has no RNG state for rank {acc.process_index}")
    c.stream.load_state_dict(raw["data"])
    if raw["data"]["position"] != raw["step"] * cfg.optim.grad_accumulation:
        raise MusarError(f"checkpoint {directory}: data position {raw['data']['position']} does not match step "
                         f"{raw['step']} x grad_accumulation {cfg.optim.grad_accumulation}")
    return raw


def save_rng(directory: Path, rank: int) -> None:
    """Python, numpy, torch CPU and CUDA generator states of this process."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    ckpt.write_json(directory / f"rng_rank{rank}.json", {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    })
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    save_file(tensors, str(directory / f"rng_rank{rank}.safetensors"))


def load_rng(directory: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for this rank."""
    meta_path, tensor_path = directory / f"rng_rank{rank}.json", directory / f"rng_rank{rank}.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        return False
    meta = ckpt.read_json(meta_path)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = ckpt.load_tensors(tensor_path)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return True
