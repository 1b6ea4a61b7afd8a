"""``musar bench``: time MUSAR's forward and routed attention against plain FLUX (bench/README.md)."""

from __future__ import annotations

import argparse

from musar.bench.settings import MODES, PRESETS
from musar.utils.dtypes import DTYPE_NAMES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time MUSAR's forward and routed attention against plain FLUX")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model (default: flux-dev-random with CUDA, else tiny)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: the preset's)")
    p.add_argument("--refs", type=int, nargs="+", default=None, help="numbers of references c to run (0 = plain FLUX)")
    p.add_argument("--height", type=int, default=None, help="output height in pixels (16 px per token)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--cond-size", type=int, default=None, help="square reference size in pixels")
    p.add_argument("--prompt-len", type=int, default=None, help="main prompt tokens (FLUX: 512)")
    p.add_argument("--phrase-len", type=int, default=None, help="tokens per subject phrase (default 32)")
    p.add_argument("--repeats", "--steps", type=int, default=None, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (compilation, autotuning)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None, help="forward modes (default: all; flex only on CUDA)")
    p.add_argument("--sdpa", choices=["default", "flash", "efficient", "cudnn", "math"], default="default",
                   help="force one SDPA kernel for the forward benchmarks")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None)
    p.add_argument("--no-attention", action="store_true", help="skip the attention microbenchmark")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="results JSON (written atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from musar.bench.runner import run_bench

    return run_bench(args)
