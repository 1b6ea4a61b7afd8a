"""Multi-process training paths on CPU (gloo, 2 ranks): DDP end to end, FSDP checkpoint helpers."""

from __future__ import annotations

import copy
import functools
import os
import socket
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(rank: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "1"})
    torch.set_num_threads(1)


def _worker(rank: int, ports: tuple[int, int], out: str) -> None:
    # One spawn for both checks: starting a process that imports torch/diffusers is the slow part.
    # Each check gets its own rendezvous port (a store's port is not free again right away).
    _env(rank, ports[0])
    _fsdp_check(rank, Path(out) / "fsdp")
    _env(rank, ports[1])
    _ddp_check(rank, Path(out) / "ddp")


def _ddp_check(rank: int, out: Path) -> None:
    from musar.train import train

    from train_fixtures import tiny_config

    result = train(tiny_config(out, "max_steps=3", "checkpoint_every=2", "validate_every=0"))
    assert result.main_process == (rank == 0)


def _fsdp_check(rank: int, out_dir: Path) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from musar.lora import BranchLoRAConfig, BranchLoRALinear, inject_branch_lora, lora_named_parameters
    from musar.lora.io import load_branch_lora
    from musar.models.transformer import MusarTransformer
    from musar.train.distributed import load_optimizer, save_lora, save_optimizer
    from musar.train.setup import select_trainable

    from helpers import make_inputs

    torch.manual_seed(0)
    model = MusarTransformer(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                             guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    inject_branch_lora(model, BranchLoRAConfig(subject_rank=8))
    select_trainable(model)
    reference = copy.deepcopy(model)
    # The wrapping of configs/accelerate/fsdp.yaml: one unit per BranchLoRALinear.
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={BranchLoRALinear})
    wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    inputs = make_inputs(model, num_conditions=2)
    wrapped(**inputs).sample.square().mean().backward()
    opt.step()
    opt.zero_grad()
    acc = types.SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=rank == 0, process_index=rank)
    if rank == 0:
        out_dir.mkdir(parents=True)
    dist.barrier()
    save_lora(acc, wrapped, model, out_dir / "lora.safetensors", {"step": "1"})  # type: ignore[arg-type]
    saved = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    save_optimizer(acc, wrapped, opt, out_dir)  # type: ignore[arg-type]
    dist.barrier()
    for state in opt.state.values():
        for v in state.values():
            v.zero_()
    load_optimizer(acc, wrapped, opt, out_dir)  # type: ignore[arg-type]
    assert all(torch.equal(saved[id(p)][k], v) for p, s in opt.state.items() for k, v in s.items())
    if rank == 0:  # the gathered LoRA equals the same step taken without FSDP
        ref_opt = torch.optim.AdamW([p for _, p in select_trainable(reference)], lr=1e-2)
        reference(**inputs).sample.square().mean().backward()
        ref_opt.step()
        fresh = copy.deepcopy(reference)
        load_branch_lora(fresh, out_dir / "lora.safetensors")
        a, b = dict(lora_named_parameters(fresh)), dict(lora_named_parameters(reference))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dist.destroy_process_group()


def test_ddp_and_fsdp_on_two_cpu_ranks(tmp_path: Path) -> None:
    ports = (_free_port(), _free_port())
    while ports[1] == ports[0]:
        ports = (ports[0], _free_port())
    ctx = mp.start_processes(_worker, args=(ports, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=2):  # re-raises a worker's exception
        if time.monotonic() > deadline:  # a collective that never completes must fail the test, not hang it
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two CPU ranks did not finish within 240 s")
    from musar.train.checkpoint import list_checkpoints, read_json
    from musar.train.tracking import read_metrics

    # FSDP: the LoRA was gathered whole (checked against an unsharded step inside the worker) and
    # every rank saved (and reloaded, bit for bit) its own optimizer shard.
    names = {p.name for p in (tmp_path / "fsdp").iterdir()}
    assert {"lora.safetensors", "optimizer_rank0.safetensors", "optimizer_rank1.safetensors"} <= names
    # DDP through the real loop: one checkpoint folder per step for both ranks, logs from rank 0.
    ddp = tmp_path / "ddp"
    assert [s for s, _ in list_checkpoints(ddp)] == [2, 3]
    last = ddp / "checkpoints" / "step_00000003"
    assert read_json(last / "trainer.json")["world_size"] == 2
    assert {p.name for p in last.glob("rng_rank*.json")} == {"rng_rank0.json", "rng_rank1.json"}
    assert [r["step"] for r in read_metrics(ddp)] == [1, 2, 3]
