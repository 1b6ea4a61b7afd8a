"""How fast ``musar --help``, every ``musar X --help`` and ``musar train --help-config`` answer, over repeated runs.

    python bench/cli_help.py [--repeats 10] [--out out.json]

Each command runs ``--repeats`` times in a fresh interpreter; the median wall time is printed
next to the ratio against a bare ``python -c pass`` measured in the same run (interpreter start
is the floor no CLI can beat). The issue's bar is 1.5 s per command on the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from musar.utils.io import atomic_write_json

COMMANDS = ["", "generate", "train", "eval", "data", "bench", "ui", "toy"]
LIMIT_S = 1.5


def median_wall(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the numbers here (as every bench does)")
    args = p.parse_args(argv)
    baseline = median_wall([sys.executable, "-c", "pass"], args.repeats)
    rows = []
    runs = [[*([cmd] if cmd else []), "--help"] for cmd in COMMANDS] + [["train", "--help-config"]]
    for cli_args in runs:
        s = median_wall([sys.executable, "-m", "musar.cli", *cli_args], args.repeats)
        rows.append({"command": " ".join(["musar", *cli_args]), "median_s": s, "vs_bare_python": s / baseline})
    print(f"bare python: {baseline:.3f} s (median of {args.repeats})")
    for r in rows:
        flag = "ok" if r["median_s"] <= LIMIT_S else f"OVER {LIMIT_S} s"
        print(f"{r['command']:<24} {r['median_s']:.3f} s  {r['vs_bare_python']:.2f}x bare python  {flag}")
    if args.out:
        atomic_write_json(args.out, {"baseline_s": baseline, "repeats": args.repeats, "rows": rows})
    return 0 if all(r["median_s"] <= LIMIT_S for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
