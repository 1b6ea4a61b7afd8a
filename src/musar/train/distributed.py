"""What differs between one process, DDP, DeepSpeed ZeRO-2 and FSDP, in one place.

* **one process / DDP**: parameters and optimizer state are whole on every rank; the main process
  saves them in the pickle-free format of :mod:`musar.train.checkpoint`. Tested (CPU).
* **FSDP**: the accelerate config wraps every ``BranchLoRALinear`` as an FSDP unit
  (``use_orig_params`` so frozen base weights and trainable LoRA weights can share a unit;
  MUSAR's block forwards call block submodules directly, so wrapping whole blocks would bypass
  FSDP's hooks). The LoRA is gathered one unit at a time with ``summon_full_params``; every rank
  saves its own optimizer shard (same pickle-free files, one pair per rank), so resuming needs
  the same number of processes.
* **DeepSpeed ZeRO-2**: parameters are whole on every rank (ZeRO-2 shards gradients and
  optimizer state only), so the LoRA is saved as usual; the partitioned optimizer state goes
  through ``engine.save_checkpoint`` into ``optimizer_backend/`` (DeepSpeed's own format).
  Gradient accumulation must be 1 there: the engine steps inside ``backward`` and a skipped
  non-finite micro-batch would desynchronise its counters.

The FSDP LoRA gathering and sharded optimizer save/load were checked with torch FSDP on CPU (gloo,
2 ranks: the gathered LoRA equals an unsharded run's bit for bit, the reloaded shards equal the
saved ones); accelerate only runs FSDP and DeepSpeed on GPUs, so the full loop under them is
not exercised by the CPU test suite.

**Launches that do what they say** (:func:`check_launch`, run by :func:`make_accelerator` before
any model loads). A launcher says how many processes it started (torchrun: ``WORLD_SIZE`` /
``LOCAL_WORLD_SIZE``; MPI: ``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE``, ...); if accelerate joins a
different number into one run, every process would train alone on its own data and all of them
would write the same output folder. On a machine without GPUs that is what accelerate does with
processes it was not told to run on the CPU (``ACCELERATE_USE_CPU=1`` or ``model.device=cpu``):
each becomes a world of one. ``accelerate launch`` with ``distributed_type: MULTI_CPU`` (or
``--cpu``) and ``num_processes > 1`` starts *one* process unless mpirun is used; and FSDP or
DeepSpeed asked for on the CPU silently becomes plain DDP. Each of these stops with one line
(exit 2) naming the fix; configs/accelerate/ddp_cpu.yaml is the launch that works on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedType, parse_flag_from_env
from torch import nn

from musar.errors import MusarError
from musar.lora.io import save_branch_lora, save_lora_tensors
from musar.train import checkpoint as ckpt
from musar.train.config import TrainConfig

FSDP_PREFIX = "_fsdp_wrapped_module."


def make_accelerator(cfg: TrainConfig, log_with: list[GeneralTracker] | None = None) -> Accelerator:
    cpu = cfg.model.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU")
    mp = cfg.model.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and not cpu else "no"
    backend = _requested_backend()
    if backend is not None and cpu:
        raise MusarError(_gpu_only(backend, "the CPU was asked for (ACCELERATE_USE_CPU or model.device=cpu)"))
    # Accumulation is done by the loop (it must be able to drop a whole step on a non-finite
    # loss); the scheduler is stepped per applied update, not per process (accelerate's default).
    try:
        accelerator = Accelerator(
            mixed_precision=mp, cpu=cpu, gradient_accumulation_steps=1, step_scheduler_with_optimizer=False,
            log_with=log_with or None,  # an empty list would make accelerate warn that no tracker is installed
        )
    except RuntimeError as e:  # accelerate's FSDP plugin on a machine without GPUs
        if backend is not None and "no available devices" in str(e):
            raise MusarError(_gpu_only(backend, "this machine has no GPU")) from None
        raise
    if is_fsdp(accelerator) and cfg.model.preset is None and cfg.model.dtype != cfg.model.lora_dtype:
        raise MusarError(f"under FSDP the base and LoRA weights share flat parameters and need one dtype: set "
                         f"model.dtype={cfg.model.lora_dtype} (base {cfg.model.dtype}, LoRA {cfg.model.lora_dtype})")
    if is_deepspeed(accelerator):
        if cfg.optim.grad_accumulation != 1:
            raise MusarError("under DeepSpeed, set optim.grad_accumulation to 1 (raise batch_size or add GPUs instead)")
        # We do not hand a DataLoader to accelerate (the curriculum stream shards itself), so
        # DeepSpeed cannot infer its micro-batch size.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.optim.batch_size
    check_launch(accelerator)
    return accelerator


# What launchers export: the number of processes of the whole job, then of this machine.
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_WORLD_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")
# accelerate's simple launcher sets this on CPU runs (and nothing else does, with this value)
_ACCELERATE_CPU_AFFINITY = "granularity=fine,compact,1,0"
_CPU_FIX = "configs/accelerate/ddp_cpu.yaml with ACCELERATE_USE_CPU=1 (docs/training.md)"


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "t", "yes", "y", "on")


def _requested_backend(env: Mapping[str, str] | None = None) -> str | None:
    """FSDP or DEEPSPEED when the launcher asked for it (accelerate launch exports these flags)."""
    env = os.environ if env is None else env
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if _flag(env, flag):
            return name
    return None


def _gpu_only(backend: str, why: str) -> str:
    return (f"the launch asks for {backend} but {why}: accelerate runs {backend} on GPUs only (on the CPU it would "
            f"train as plain DDP); for several CPU processes use {_CPU_FIX}")


def launched_processes(env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """How many processes the launcher says this job has, and the variable that says so."""
    env = os.environ if env is None else env
    for names in (_WORLD_VARS, _LOCAL_WORLD_VARS):
        for name in names:
            value = env.get(name, "").strip()
            if value.isdigit():
                return int(value), name
    return None


def launch_problem(num_processes: int, distributed_type: Any, device_type: str,
                   env: Mapping[str, str] | None = None) -> str | None:
    """Why this launch would not do what it says (one line), or None when it does.

    ``num_processes``, ``distributed_type``, ``device_type``: what accelerate made of it;
    ``env``: the launcher's environment (default ``os.environ``).
    """
    env = os.environ if env is None else env
    dtype = getattr(distributed_type, "value", str(distributed_type))
    launched = launched_processes(env)
    if launched is not None:
        n, var = launched
        mismatch = num_processes != n if var in _WORLD_VARS else num_processes < n
        if n > 1 and mismatch:
            if num_processes == 1 and device_type == "cpu":
                return (f"the launcher started {n} processes ({var}={n}) but accelerate found no GPU and was not told to "
                        f"use the CPU, so each would train alone: on CPU use {_CPU_FIX} or --set model.device=cpu")
            return (f"the launcher started {n} processes ({var}={n}) but accelerate joined {num_processes} into this run "
                    f"({dtype}); check the launcher's and accelerate's process counts")
    elif (num_processes == 1 and _flag(env, "ACCELERATE_USE_CPU") and env.get("MASTER_ADDR")
          and env.get("KMP_AFFINITY") == _ACCELERATE_CPU_AFFINITY):
        # accelerate launch's simple launcher exports MASTER_ADDR only for num_processes/num_machines > 1
        return ("accelerate launch started 1 process although its config asks for several (with --cpu or "
                f"distributed_type MULTI_CPU it starts one unless --mpirun_hostfile is given): use {_CPU_FIX}")
    wanted = _requested_backend(env)
    if wanted is not None and dtype != wanted:
        return _gpu_only(wanted, f"accelerate runs this process as {dtype} on {device_type}")
    return None


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a launch whose processes would not form the run it asks for (MusarError: exit 2)."""
    problem = launch_problem(accelerator.num_processes, accelerator.distributed_type, accelerator.device.type)
    if problem is not None:
        raise MusarError(problem)


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def any_across(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """For each flag: is it set on any process? (One small all-reduce for all of them.)"""
    local = torch.tensor([float(f) for f in flags], device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    return [bool(v > 0) for v in total.tolist()]


def mean_across(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, reduction="mean").item())


def _gather_fsdp_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full LoRA tensors with plain names, one FSDP unit at a time (collective).

    Gathering the whole model instead would materialise all 12B base weights on one rank; the
    units of configs/accelerate/fsdp.yaml are single BranchLoRALinear layers, so this holds one
    layer at a time. LoRA weights outside such units are gathered with the rest of their unit.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out: dict[str, torch.Tensor] = {}
    for path, unit in model.named_modules():
        if not isinstance(unit, FSDP):
            continue
        prefix = path.replace(FSDP_PREFIX, "")
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for name, p in unit.module.named_parameters():
                if FSDP_PREFIX in name:  # owned by a nested unit (still sharded here); gathered on its own pass
                    continue
                if ".lora_A." in f".{name}" or ".lora_B." in f".{name}":
                    out[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
    return out


def save_lora(accelerator: Accelerator, model: nn.Module, transformer: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write the LoRA file (main process); a collective call under FSDP."""
    if is_fsdp(accelerator):
        tensors = _gather_fsdp_lora(model)
        if accelerator.is_main_process:
            save_lora_tensors(transformer.lora_config, tensors, path, metadata=metadata)
        return
    if accelerator.is_main_process:
        save_branch_lora(transformer, path, metadata=metadata)


def save_optimizer(accelerator: Accelerator, model: Any, optimizer: Any, directory: Path) -> None:
    """Optimizer state into ``directory`` (collective under FSDP and DeepSpeed)."""
    if is_deepspeed(accelerator):
        model.save_checkpoint(str(directory / "optimizer_backend"), exclude_frozen_parameters=True)
    elif is_fsdp(accelerator):
        # Each rank's AdamW holds state for its own shard views (use_orig_params): saving the
        # shards as they are needs no gather and restores exactly on the same number of ranks.
        ckpt.write_optimizer_state(optimizer.state_dict(), directory, f"optimizer_rank{accelerator.process_index}")
    elif accelerator.is_main_process:
        ckpt.write_optimizer_state(optimizer.state_dict(), directory)


def load_optimizer(accelerator: Accelerator, model: Any, optimizer: Any, directory: Path) -> None:
    if is_deepspeed(accelerator):
        model.load_checkpoint(
            str(directory / "optimizer_backend"), load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        return
    name = f"optimizer_rank{accelerator.process_index}" if is_fsdp(accelerator) else "optimizer"
    optimizer.load_state_dict(ckpt.read_optimizer_state(directory, name))
