"""The ``musar`` command line: one entry point, thin subcommands, answers at once.

Only the chosen subcommand's module is imported, and each subcommand module imports nothing
heavy (torch, diffusers, gradio, datasets) until its ``run`` function is called, so ``musar
--help`` and ``musar X --help`` do not pay for a model stack they will not use. A user error
(:class:`~musar.errors.MusarError`) becomes one line on stderr and exit code 2. Every argument is
checked (:mod:`musar.cli.args`) before the command's ``run`` starts. One error boundary
(:func:`musar.errors.describe_failure`) turns every failure the user can act on (bad input, an
unreadable or hostile file, a full disk, out of memory) into one line: exit 2 for input, 1 for
a run that failed on the machine. A bug keeps its traceback; ``musar --traceback ...`` shows the
traceback of handled failures too.

Subcommands are registered by module name: ``add_parser(subparsers)`` builds the parser and sets
``func(args) -> int``. The miniature world's ``toy`` command lives in its own package and is
registered here by name only; the core never imports it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence

from musar.cli.args import validate
from musar.errors import describe_failure

# name -> (module providing `add_parser(subparsers)`, one-line help shown by `musar --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("musar.cli.generate", "generate an image from a prompt and reference subjects"),
    "train": ("musar.cli.train", "train the dual-branch MUSAR LoRA from a YAML config"),
    "eval": ("musar.cli.eval", "DreamBench evaluation: generate, score (DINO / CLIP-I / CLIP-T), report"),
    "data": ("musar.cli.data", "preview and count training data (Subjects200K, MUSAR-Gen)"),
    "bench": ("musar.cli.bench", "time MUSAR's forward and routed attention against plain FLUX"),
    "ui": ("musar.cli.ui", "web UI (Gradio) for multi-subject generation"),
    "toy": ("musar.toy.cli", "the miniature world: pretrain, MUSAR-train, ablate, report, demo (CPU)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage; keep it to one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(full: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with the full parsers of the ``full`` subcommands (default: all) and
    one-line stubs for the others (``musar --help`` needs nothing more)."""
    parser = _Parser(prog="musar", description="MUSAR multi-subject customization for FLUX.1-dev.")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of a failure instead of its one-line message (for bug reports)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if full is None or name in full:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line, if any (options before it are top-level)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    try:
        validate(args)  # every argument's deferred checks, before the command imports anything heavy
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"musar {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the one boundary: describe_failure decides what is a bug
        failure = describe_failure(e)
        if failure is None or args.traceback:
            raise
        code, line = failure
        print(f"musar {args.command}: error: {line}", file=sys.stderr)
        return code
