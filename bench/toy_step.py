"""Where a toy MUSAR training step's time goes, and what would make it faster (issue 21, item 6).

A measurement script, not library code. It builds the trainer of ``configs/toy_musar.yaml`` on
the shipped toy base and fresh toy pairs in a temporary folder, runs ``--steps`` steps of one
curriculum stage, and prints the rate over the steps after the first ``--warmup`` and the sha256
of the trained LoRA weights (equal sha256: the mode computes bit-exactly what eager computes):

    .venv/bin/python bench/toy_step.py --mode eager --stage 1          # the baseline
    .venv/bin/python bench/toy_step.py --mode compile --stage 1        # torch.compile of the transformer
    .venv/bin/python bench/toy_step.py --mode bf16 --stage 1           # bf16 autocast
    .venv/bin/python bench/toy_step.py --mode eager --stage 2 --profile   # the top ops (torch.profiler)

Compare modes only against a baseline of the same session on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import torch

import musar.toy.codec  # noqa: F401  (diffusers resolves the toy codec class from sys.modules)
from musar.toy.model import SHIPPED_BASE
from musar.toy.world import write_pairs_parquet
from musar.train import load_config
from musar.train.loop import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["eager", "compile", "bf16"], default="eager")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1, help="1: single subjects; 2: diptychs")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate (compiling happens here)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops over 20 more steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(SHIPPED_BASE, work / "base")
        write_pairs_parquet(300, work / "pairs.parquet", seed=1, size=64, brief=True)
        overrides = [f"output_dir={work / 'run'}", f"model.pretrained={work / 'base'}", f"data.source={work / 'pairs.parquet'}",
                     f"model.cpu_threads={args.threads}", "checkpoint_every=0"]
        if args.stage == 2:
            overrides.append("curriculum.stage1_steps=0")
        trainer = Trainer(load_config("configs/toy_musar.yaml", overrides))
        torch.set_num_threads(args.threads)
        if args.mode == "compile":
            trainer.c.model = torch.compile(trainer.c.model)
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.mode == "bf16" else contextlib.nullcontext
        walls = []
        for _ in range(args.steps):
            batches = trainer.next_batches()
            t0 = time.perf_counter()
            with autocast():
                trainer.train_step(batches)
            walls.append(time.perf_counter() - t0)
        timed = walls[args.warmup:]
        digest = hashlib.sha256()
        for _, p in sorted((n, p) for n, p in trainer.c.transformer.named_parameters() if p.requires_grad):
            digest.update(p.detach().float().numpy().tobytes())
        print(f"{args.mode} stage {args.stage}: {len(timed) / sum(timed):.2f} steps/s over steps {args.warmup}-{args.steps} "
              f"(first step {walls[0]:.1f} s) at {args.threads} thread(s); LoRA sha256 {digest.hexdigest()[:16]}")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    trainer.train_step(trainer.next_batches())
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        trainer.release()


if __name__ == "__main__":
    main()
