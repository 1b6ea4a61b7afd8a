"""``musar toy``: the toy world's whole chain, stage by stage or in one command (issue 8).

    musar toy all --out runs/toy            # pretrain -> data -> MUSAR variants (2 at a time) -> gates + report
    musar toy pretrain --out runs/toy       # base model -> runs/toy/base
    musar toy data --out runs/toy           # Subjects200K-schema pairs -> runs/toy/pairs.parquet
    musar toy train --out runs/toy --variant full   # one variant (musar train + overrides)
    musar toy report --out runs/toy         # markdown table + grids -> runs/toy/report/
    musar toy ship --out runs/toy           # copy base + full LoRA into the package
    musar toy demo --out outputs/toy_demo   # shipped weights -> composition + verdict

Loading a toy folder anywhere (``musar train --config configs/toy_musar.yaml`` too) imports the
toy codec through the ``musar.components`` entry point (:mod:`musar.utils.registry`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from musar.utils.validation import COUNT, SEED, THREADS, Number

# Processes side by side: each holds a model and a torch thread pool.
JOBS = Number("jobs", int, 1, 64)

DEFAULT_OUT = "runs/toy"


BASE_CONFIG = "configs/toy_base.yaml"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"working folder (default {DEFAULT_OUT})")
    p.add_argument("--threads", type=THREADS, default=None, help="CPU threads of this stage's process (default: the configs' 2)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("toy", help="the toy world: pretrain, MUSAR-train, ablate, report, demo (CPU minutes)",
                       description="MUSAR in miniature on a procedural world measured exactly. See docs/toy.md.")
    s = p.add_subparsers(dest="toy_command", required=True, metavar="STAGE",
                         help="a stage of the chain (pretrain -> data -> train -> report -> ship), all of them, or the demo")
    from musar.toy.rows import ROWS
    from musar.toy.variants import DEFAULT_CONFIG, VARIANTS

    a = s.add_parser("pretrain", help="train the tiny FLUX base text-to-image on world scenes")
    _add_common(a)
    a.add_argument("--config", default=BASE_CONFIG, help=f"pretraining recipe (default {BASE_CONFIG})")
    a.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override a recipe key, e.g. steps=500 or codec.steps=100")
    a.add_argument("--force", action="store_true", help="start over: do not resume the checkpoints of a stopped pretraining")
    d = s.add_parser("data", help="write the Subjects200K-schema toy pairs (training identities)")
    _add_common(d)
    d.add_argument("--pairs", type=COUNT, default=3000, help="number of pairs (default 3000)")
    t = s.add_parser("train", help="train one MUSAR variant with musar train")
    _add_common(t)
    t.add_argument("--variant", default="full", choices=list(VARIANTS), help="which variant (default full; docs/toy.md)")
    t.add_argument("--config", default=DEFAULT_CONFIG, help=f"musar train config (default {DEFAULT_CONFIG})")
    t.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override a musar train key, e.g. curriculum.stage1_steps=100")
    t.add_argument("--force", action="store_true", help="start the variant over: retrain even if its LoRA exists, and do not resume its checkpoints")
    r = s.add_parser("report", help="gates and the Fig. 8 table on held-out cases")
    _add_common(r)
    r.add_argument("--cases", type=COUNT, default=24, help="held-out cases per subject count (default 24)")
    r.add_argument("--seeds", type=COUNT, default=2, help="sampling seeds per case (default 2)")
    r.add_argument("--rows", nargs="+", default=None, choices=[x.name for x in ROWS], metavar="ROW",
                   help="rows to score (default all): " + ", ".join(x.name for x in ROWS))
    r.add_argument("--no-base-gates", action="store_true", help="skip the base's gate 0/1 probes")
    r.add_argument("--jobs", type=JOBS, default=1,
                   help="units (row x training seed) scored side by side, one process each at --threads // jobs "
                        "threads (default 1); finished units are kept, so a stopped report resumes")
    sh = s.add_parser("ship", help="copy the trained base and full LoRA into src/musar/assets/toy")
    _add_common(sh)
    al = s.add_parser("all", help="pretrain, data, all variants, report (skips finished stages)")
    _add_common(al)
    al.add_argument("--config", default=DEFAULT_CONFIG, help=f"musar train config of every variant (default {DEFAULT_CONFIG})")
    al.add_argument("--base-config", default=BASE_CONFIG, help=f"pretraining recipe (default {BASE_CONFIG})")
    al.add_argument("--jobs", type=JOBS, default=2, help="variants trained side by side, one process each (default 2)")
    de = s.add_parser("demo", help="compose two toy references with the shipped weights; print the verdict")
    de.add_argument("--out", default="outputs/toy_demo", metavar="DIR",
                    help="where the compositions, routing maps, verdicts and contact sheet go (default outputs/toy_demo)")
    de.add_argument("--seed", type=SEED, default=0, help="sampling seed of the fixed cases (default 0)")
    de.add_argument("--write-examples", action="store_true", help="(re)write examples/toy/ reference PNGs first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt as e:  # musar.train.loop.TrainingInterrupted: a checkpoint was saved
        if getattr(e, "checkpoint", None) is None:
            raise
        print(f"musar toy {args.toy_command}: {e}; run the same command again to resume", file=sys.stderr)
        return 128 + int(e.signum)  # type: ignore[attr-defined]


def _run(args: argparse.Namespace) -> int:
    from musar.toy import stages

    cmd = args.toy_command
    if cmd == "demo":
        from musar.toy.demo import run_demo, write_examples

        if args.write_examples:
            write_examples()
        print(run_demo(args.out, args.seed))
        return 0
    out = Path(args.out)
    if cmd == "pretrain":
        stages.pretrain(out, args.config, args.overrides, args.threads, args.force)
    elif cmd == "data":
        print(f"wrote {stages.data(out, args.pairs)}")
    elif cmd == "train":
        from musar.toy.variants import train_variant

        extra = stages.train_extra(args.overrides, args.threads)
        print(f"LoRA: {train_variant(args.variant, out, args.config, extra, args.force)}")
    elif cmd == "report":
        from musar.toy.report import run_report

        run_report(out, args.rows, args.cases, tuple(range(args.seeds)), base_gates=not args.no_base_gates, jobs=args.jobs,
                   threads=max(1, args.threads // args.jobs) if args.threads else None)
    elif cmd == "ship":
        print(f"shipped to {stages.ship(out)}")
    elif cmd == "all":
        from musar.toy.chain import run_chain

        run_chain(out, args.base_config, args.config, args.threads, jobs=args.jobs)
    return 0

