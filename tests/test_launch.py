"""The documented multi-process launch on CPU, run for real; launches that would not do what they say.

``ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/ddp_cpu.yaml -m musar.cli
train ...`` must be *one* run of world size 2 (not two independent trainers writing one folder),
and its LoRA must equal the one a single process gets from the same data with twice the batch.
A launch whose process count and world size disagree stops in every process with one line
(exit 2) before any model loads (:func:`musar.train.distributed.check_launch`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType

from musar.train.distributed import launch_problem, launched_processes

from train_fixtures import REPO, tiny_config

pytestmark = pytest.mark.slow

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
STEPS, PER_RANK_BATCH = 3, 1
# The cure every CPU mismatch names.
CPU_FIX = "configs/accelerate/ddp_cpu.yaml with ACCELERATE_USE_CPU=1"
# 2 ranks vs 1 process: the same float32 operations in the same order on each sample; DDP's mean
# of the two ranks' gradients, (g0 + g1) / 2, and the reference's g0 / 2 + g1 / 2 are both exact
# scalings by a power of two of one two-term sum, so the LoRAs agree bit for bit in practice. The
# tolerance only allows for a different all-reduce (e.g. a bucketed ring summing in another order,
# ~1 ulp of a gradient, which Adam's first steps can magnify to ~lr * 1e-4 on a near-zero gradient).
ATOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "FSDP_")) and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                      "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # No GPU, so a GPU machine behaves like this CPU one (and no rank waits on NCCL); one thread per rank.
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _train_args(out: Path) -> list[str]:
    return ["-m", "musar.cli", "train", "--config", "configs/tiny.yaml", "--output-dir", str(out),
            "--max-steps", str(STEPS), "--set", "validate_every=0", "--set", "report_to=[none]",
            "--set", f"optim.batch_size={PER_RANK_BATCH}"]


def _launch(args: list[str], out: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    cmd = [ACCELERATE, "launch", *args, "--main_process_port", str(_free_port()), *_train_args(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _reference_lora(out: Path) -> dict[str, torch.Tensor]:
    """One process, each step the two ranks' batches (same data, same noise seeds): batch 2 x 1."""
    from safetensors.torch import load_file

    from musar.data import CurriculumStream, make_loader
    from musar.lora.io import save_branch_lora
    from musar.train.loop import Trainer, step_seed

    cfg = tiny_config(out, f"max_steps={STEPS}", "validate_every=0", f"optim.batch_size={PER_RANK_BATCH}")
    trainer = Trainer(cfg)
    c, acc, world = trainer.c, trainer.acc, 2
    assert acc.num_processes == 1
    ranks = [iter(make_loader(CurriculumStream(c.stream.source, c.stream.cfg, batch_size=PER_RANK_BATCH, rank=r,
                                               world_size=world, musar_gen=c.stream.musar_gen, seed=cfg.seed),
                              transform=c.stream.transform)) for r in range(world)]
    c.model.train()
    for step in range(STEPS):
        # DDP with 1 batch per rank: grad = mean over ranks of each rank's gradient; here the same
        # mean as an accumulation of the ranks' batches, each with the noise seed of its rank.
        for r, batches in enumerate(ranks):
            loss = trainer.compute_loss(next(batches), step_seed(cfg.seed, r, step, 0))
            acc.backward(loss / world)
        acc.clip_grad_norm_(c.params, cfg.optim.max_grad_norm)
        c.optimizer.step()
        c.scheduler.step()
        c.optimizer.zero_grad(set_to_none=True)
    path = out / "reference.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_branch_lora(c.transformer, path)
    return load_file(str(path))


def test_documented_cpu_launch_is_one_run_of_two_ranks(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from musar.train.checkpoint import list_checkpoints, read_json

    out = tmp_path / "ddp"
    proc = _launch(["--config_file", "configs/accelerate/ddp_cpu.yaml"], out, _env(ACCELERATE_USE_CPU="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"trained {STEPS} steps") == 1, proc.stdout  # one run: only rank 0 reports
    (_, last), = [cp for cp in list_checkpoints(out) if cp[0] == STEPS]
    assert read_json(last / "trainer.json")["world_size"] == 2
    assert {p.name for p in last.glob("rng_rank*.json")} == {"rng_rank0.json", "rng_rank1.json"}

    ddp = load_file(str(out / "lora.safetensors"))
    ref = _reference_lora(tmp_path / "ref")
    assert ddp.keys() == ref.keys() and ddp
    worst = max(float((ddp[k].double() - ref[k].double()).abs().max()) for k in ddp)
    print(f"max |LoRA(2 ranks x batch 1) - LoRA(1 process x batch 2)| = {worst:.3g} (atol {ATOL})")
    assert worst <= ATOL
    # and training moved it (a LoRA still at its initial value would match trivially)
    assert any(float(ddp[k].abs().max()) > 0 for k in ddp if "lora_B" in k)


@pytest.mark.parametrize("how", ["no_cpu_flag", "accelerate_cpu_flag"])
def test_mismatched_launch_stops_every_process_with_one_line(tmp_path: Path, how: str) -> None:
    """The launches that looked like DDP on CPU but were not: torchrun ranks that each see a world of
    one (no CPU flag, no GPU), and accelerate's ``--cpu`` launcher starting one process for two."""
    out = tmp_path / "out"
    if how == "no_cpu_flag":
        proc = _launch(["--config_file", "configs/accelerate/ddp_cpu.yaml"], out, _env())
        want = "the launcher started 2 processes (WORLD_SIZE=2) but accelerate found no GPU"
        processes = 2
    else:
        proc = _launch(["--cpu", "--config_file", "configs/accelerate/ddp_cpu.yaml"], out, _env())
        want = "accelerate launch started 1 process although its config asks for several"
        processes = 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("musar train: error:")]
    assert proc.returncode != 0  # accelerate's launchers turn the processes' exit 2 into their own 1
    # torchrun ends the other rank (SIGTERM) once one has failed, so it may not get to print its line
    assert 1 <= len(lines) <= processes and all(want in ln and CPU_FIX in ln for ln in lines), proc.stderr[-3000:]
    if processes == 2:  # torchrun's report names the first failure's exit code
        assert "exitcode  : 2 " in proc.stderr, proc.stderr[-3000:]
    else:
        assert "returned non-zero exit status 2." in proc.stderr, proc.stderr[-3000:]
    assert "trained" not in proc.stdout and not (out / "checkpoints").exists()


def test_mismatched_process_exits_2_with_one_line(tmp_path: Path) -> None:
    """A process whose launcher says 2 processes but that accelerate runs as a world of one: exit 2,
    exactly one line, nothing written. (No LOCAL_RANK: with it, accelerate would first wait for the
    second rank to join its process group, as the torchrun ranks of the test above do.)"""
    env = _env(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, *_train_args(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "musar train: error: the launcher started 2 processes (WORLD_SIZE=2) but accelerate found no GPU and was not "
        f"told to use the CPU, so each would train alone: on CPU use {CPU_FIX} (docs/training.md) or --set "
        "model.device=cpu"
    ]
    assert proc.stdout == "" and not (out / "checkpoints").exists()


CPU_AFFINITY = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "KMP_AFFINITY": "granularity=fine,compact,1,0"}


@pytest.mark.parametrize(("seen", "env", "problem"), [
    ((2, DistributedType.MULTI_CPU, "cpu"), {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, None),
    ((8, DistributedType.MULTI_GPU, "cuda"), {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, None),
    ((1, DistributedType.NO, "cpu"), {}, None),
    ((1, DistributedType.NO, "cpu"), {"WORLD_SIZE": "1"}, None),
    ((1, DistributedType.NO, "cpu"), {"MASTER_ADDR": "10.0.0.1"}, None),  # exported by hand, no launcher
    ((1, DistributedType.NO, "cpu"), {"ACCELERATE_USE_CPU": "True", "KMP_AFFINITY": CPU_AFFINITY["KMP_AFFINITY"]}, None),
    ((2, DistributedType.FSDP, "cuda"), {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, None),
    ((1, DistributedType.NO, "cpu"), {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "found no GPU"),
    ((1, DistributedType.NO, "cpu"), {"LOCAL_WORLD_SIZE": "2"}, "(LOCAL_WORLD_SIZE=2) but accelerate found no GPU"),
    ((1, DistributedType.NO, "cpu"), {"OMPI_COMM_WORLD_SIZE": "4"}, "(OMPI_COMM_WORLD_SIZE=4)"),
    ((4, DistributedType.MULTI_GPU, "cuda"), {"WORLD_SIZE": "8"}, "but accelerate joined 4 into this run (MULTI_GPU)"),
    ((1, DistributedType.NO, "cpu"), CPU_AFFINITY, "accelerate launch started 1 process"),
    ((2, DistributedType.MULTI_CPU, "cpu"), {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
     "asks for FSDP but accelerate runs this process as MULTI_CPU on cpu"),
    ((2, DistributedType.MULTI_CPU, "cpu"), {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"},
     "asks for DEEPSPEED but accelerate runs this process as MULTI_CPU"),
])
def test_launch_problem(seen: tuple[int, DistributedType, str], env: dict[str, str], problem: str | None) -> None:
    found = launch_problem(*seen, env=env)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and "\n" not in found and len(found) <= 300
    assert launched_processes({}) is None and launched_processes({"WORLD_SIZE": "3"}) == (3, "WORLD_SIZE")


def test_fsdp_on_cpu_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """accelerate's own refusal (a RuntimeError traceback from its FSDP plugin) becomes one line."""
    from musar.errors import MusarError
    from musar.train.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(MusarError, match="asks for FSDP but the CPU was asked for"):
        make_accelerator(tiny_config(tmp_path))
