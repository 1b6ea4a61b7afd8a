"""``musar bench``: time MUSAR's forward and routed attention against plain FLUX (bench/README.md)."""

from __future__ import annotations

import argparse

from musar.bench.settings import MODES, PRESETS, preset_name
from musar.cli.args import HelpFormatter, add, value
from musar.utils.dtypes import DTYPE_NAMES
from musar.utils.validation import (
    BENCH_SIZE,
    CONDITION_SIZE,
    REFS,
    REPEATS,
    SEED,
    THREADS,
    TOKENS,
    WARMUP,
    check_output_files,
    device_name,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time MUSAR's forward and routed attention against plain FLUX",
                       formatter_class=HelpFormatter)
    add(p, "--preset", type=preset_name, choices=sorted(PRESETS), default=None,
        help="model (default: flux-dev-random with CUDA, else tiny)")
    add(p, "--device", type=device_name, default=None, help="cpu, cuda or cuda:N (default: the preset's)")
    add(p, "--refs", type=REFS, nargs="+", default=None,
        help=f"numbers of references c to run (0 = plain FLUX; each {REFS.describe()}) (default: the preset's)")
    add(p, "--height", type=BENCH_SIZE, default=None, help=f"output height in pixels ({BENCH_SIZE.describe()}) (default: the preset's)")
    add(p, "--width", type=BENCH_SIZE, default=None, help=f"output width in pixels ({BENCH_SIZE.describe()}) (default: the preset's)")
    add(p, "--cond-size", type=CONDITION_SIZE, default=None, help=f"square reference size ({CONDITION_SIZE.describe()}) (default: the preset's)")
    add(p, "--prompt-len", type=TOKENS, default=None, help=f"main prompt tokens ({TOKENS.describe()}) (default: the preset's; FLUX: 512)")
    add(p, "--phrase-len", type=TOKENS, default=None, help=f"tokens per subject phrase ({TOKENS.describe()}) (default: the preset's; FLUX: 32)")
    add(p, "--repeats", "--steps", type=REPEATS, default=None,
        help=f"timed calls per measurement; median, min-max and IQR reported ({REPEATS.describe()}) (default: the preset's)")
    add(p, "--warmup", type=WARMUP, default=None, help=f"untimed calls first: compilation, autotuning ({WARMUP.describe()}) (default: the preset's)")
    add(p, "--modes", nargs="+", choices=MODES, default=None, help="forward modes (default: all; flex only on CUDA)")
    add(p, "--sdpa", choices=["default", "flash", "efficient", "cudnn", "math"], default="default",
        help="force one SDPA kernel for the forward benchmarks")
    add(p, "--dtype", choices=DTYPE_NAMES, default=None, help="model dtype (default: the preset's)")
    add(p, "--no-attention", action="store_true", help="skip the attention microbenchmark")
    add(p, "--threads", type=THREADS, default=None, help=f"CPU threads for torch ({THREADS.describe()}) (default: torch's choice)")
    add(p, "--seed", type=SEED, default=0, help=f"seed of the random weights and inputs ({SEED.describe()})")
    # Optional, as in timing tools generally: a look at the numbers should not need a file name.
    add(p, "--out", default=None, check=value(lambda f: check_output_files([f])),
        help="also write every number to this JSON file, atomically (default: print the tables, write nothing)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from musar.bench.runner import run_bench

    return run_bench(args)
