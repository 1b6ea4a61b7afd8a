"""``musar train``: train MUSAR's dual-branch LoRA from a YAML config.

One process::

    musar train --config configs/tiny.yaml
    musar train --config configs/musar_flux_dev.yaml --output-dir runs/musar --resume latest

Several GPUs (the same command line under accelerate's launcher; see docs/training.md)::

    accelerate launch --config_file configs/accelerate/ddp.yaml -m musar.cli train --config configs/musar_flux_dev.yaml

Exit codes: 0 done, 2 user error (one line on stderr), 3 stopped after too many non-finite
losses, 130 / 143 interrupted by SIGINT / SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from musar.utils.checks import positive_int

EXIT_STOPPED = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the MUSAR LoRA (single process, or under accelerate launch)",
        description="Train MUSAR's dual-branch LoRA on the 3-stage curriculum. See docs/training.md.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="YAML config (e.g. configs/tiny.yaml)")
    p.add_argument("--max-steps", type=positive_int, default=None, metavar="N", help="override max_steps")
    p.add_argument("--output-dir", default=None, metavar="DIR", help="override output_dir")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue from the newest checkpoint of the output dir, or from a checkpoint folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any config key, e.g. --set optim.lr=5e-5 (repeatable); see --help-config")
    p.add_argument("--help-config", action=_HelpConfig, help="list every config key with its type, default and meaning, then exit")
    p.set_defaults(func=run)


class _HelpConfig(argparse.Action):
    """Like --help: prints and exits while parsing, so --config is not required for it."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from musar.train.config import TrainConfig
        from musar.utils.config_help import config_reference

        title = ("Config keys of `musar train`: YAML keys (sections as nested mappings) or --set KEY=VALUE "
                 "(values parsed as YAML).")
        sys.stdout.write(config_reference(TrainConfig, title))
        parser.exit()


def run(args: argparse.Namespace) -> int:
    from musar.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    changes = {}
    if args.max_steps is not None:
        changes["max_steps"] = args.max_steps
    if args.output_dir is not None:
        changes["output_dir"] = args.output_dir
    cfg = dataclasses.replace(cfg, **changes).check()

    from musar.train.loop import TrainingInterrupted, TrainingStopped, train

    try:
        result = train(cfg, resume=args.resume)
    except TrainingStopped as e:
        print(f"musar train: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except TrainingInterrupted as e:
        print(f"musar train: {e}; continue with --resume latest", file=sys.stderr)
        return 128 + int(e.signum)
    state = result.state
    if not result.main_process:
        return 0
    print(f"trained {state.step} steps ({state.updates} updates, {state.nonfinite_total} skipped as non-finite)")
    print(f"LoRA: {result.lora_path}")
    print(f"checkpoint: {result.checkpoint}")
    return 0

