"""``musar train``: train MUSAR's dual-branch LoRA from a YAML config.

One process::

    musar train --config configs/tiny.yaml
    musar train --config configs/musar_flux_dev.yaml --output-dir runs/musar --resume latest

Several GPUs (the same command line under accelerate's launcher; see docs/training.md)::

    accelerate launch --config_file configs/accelerate/ddp.yaml -m musar.cli train --config configs/musar_flux_dev.yaml

Exit codes: 0 done (or already complete), 2 user error (one line on stderr: a bad argument or
config key, an output folder another run holds, a resume whose config differs from the run's, a
damaged checkpoint given by path, a run already past --max-steps), 3 stopped after too many
non-finite losses, 130 / 143 interrupted by SIGINT / SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

from musar.cli.args import HelpFormatter, add, value
from musar.utils.validation import COUNT, check_input_dir, check_input_file, check_output_dir, key_value

if TYPE_CHECKING:
    from musar.train.checkpoint import ResumePoint
    from musar.train.config import TrainConfig

EXIT_STOPPED = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the MUSAR LoRA (single process, or under accelerate launch)",
        description="Train MUSAR's dual-branch LoRA on the 3-stage curriculum. See docs/training.md.",
        formatter_class=HelpFormatter,
    )
    add(p, "--config", required=True, metavar="FILE", check=value(lambda f: check_input_file(f, "config file")),
        help="YAML config (e.g. configs/tiny.yaml)")
    add(p, "--max-steps", type=COUNT, default=None, metavar="N", help="override max_steps (an integer >= 1) (default: the config's)")
    add(p, "--output-dir", default=None, metavar="DIR", check=value(check_output_dir), help="override output_dir (default: the config's)")
    add(p, "--resume", default=None, metavar="latest|PATH", check=value(_check_resume),
        help="continue from the newest valid checkpoint of the output dir, or from a checkpoint folder "
        "(default: start afresh)")
    add(p, "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", type=key_value,
        help="override any config key, e.g. --set optim.lr=5e-5 (repeatable; default: none); see --help-config")
    p.add_argument("--help-config", action=_HelpConfig, help="list every config key with its type, default and meaning, then exit")
    p.set_defaults(func=run)


def _check_resume(spec: str) -> None:
    # The checkpoint's files are validated by the trainer (musar.train.checkpoint.find_resume),
    # after the config names the output folder and before any model loads.
    if spec != "latest":
        check_input_dir(spec, "checkpoint folder")


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
    check_output_dir(cfg.output_dir)
    from pathlib import Path

    from musar.cli.preflight import check_training_memory

    # A batch that cannot fit is refused from the model's configs (a preset is built, small by
    # design) before any data or weight loads: for a new folder before the run lock creates it,
    # for an existing one after its checkpoints were judged (a damaged one is named first).
    fresh = not Path(cfg.output_dir).expanduser().exists()
    if fresh:
        check_training_memory(cfg)
    from musar.train.checkpoint import plan_resume
    from musar.train.fingerprint import is_main_launch_process
    from musar.utils import run_lock

    main = is_main_launch_process()
    # Held from here to the end, so that no other run changes the checkpoints between the plan
    # and the training; the trainer takes the same lock again (reentrant within a process).
    with run_lock.hold(cfg.output_dir, "training run", enabled=main):
        # Validates every file of the checkpoint to resume from (falling back to the newest valid
        # one for `latest`), compares its config with this one and refuses a run already past
        # max_steps, before the model stack is imported.
        start = plan_resume(cfg.output_dir, args.resume, cfg.total_steps, cfg)
        if start is not None and start.step >= cfg.total_steps:
            return _already_complete(cfg.output_dir, start, main)
        if not fresh:
            check_training_memory(cfg)
        return _train(cfg, start)


def _train(cfg: TrainConfig, start: ResumePoint | None) -> int:
    from musar.train.loop import TrainingInterrupted, TrainingStopped, train

    try:
        result = train(cfg, resume=start)
    except TrainingStopped as e:
        print(f"musar train: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except TrainingInterrupted as e:
        print(f"musar train: {e}; continue with --resume latest", file=sys.stderr)
        return 128 + int(e.signum)
    state = result.state
    if not result.main_process:
        return 0
    since = f" (from step {result.start_step} to {state.step})" if result.start_step else ""
    n = state.step - result.start_step
    print(f"trained {n} step{'s' if n != 1 else ''}{since}: {state.updates} updates in all, "
          f"{state.nonfinite_total} skipped as non-finite")
    print(f"LoRA: {result.lora_path}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _already_complete(output_dir: str, start: ResumePoint, main: bool) -> int:
    """A resume of a finished run: nothing to train, no model to load; the final LoRA is put
    back in place if it went missing (a crash between the last checkpoint and its copy)."""
    from pathlib import Path

    from musar.utils.io import atomic_write, file_sha256

    if not main:
        return 0
    for line in start.describe(resuming=False):
        print(f"musar train: {line}", file=sys.stderr)
    saved, lora = start.path / "lora.safetensors", Path(output_dir) / "lora.safetensors"
    if not lora.is_file() or file_sha256(lora) != file_sha256(saved):
        atomic_write(lora, lambda tmp: tmp.write_bytes(saved.read_bytes()))
    print(f"already complete: {start.path.name} is at step {start.step}, the run's last; nothing trained "
          "(raise --max-steps to train on)")
    print(f"LoRA: {lora}")
    print(f"checkpoint: {start.path}")
    return 0
