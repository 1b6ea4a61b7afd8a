"""The ``musar`` command line. Subcommands are thin: each lives in its own module and registers
itself through ``add_parser(subparsers)``; this file only dispatches and turns user errors into
one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from musar.errors import MusarError

# name -> module providing `add_parser(subparsers) -> None`; the parser sets `func(args) -> int`.
SUBCOMMANDS: dict[str, str] = {
    "generate": "musar.generate_cli",
    "data": "musar.data.cli",
    "eval": "musar.eval.cli",
    "ui": "musar.ui.cli",
    "bench": "musar.bench",
    "train": "musar.train.cli",
    "toy": "musar.toy.cli",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage; keep it to one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="musar", description="MUSAR multi-subject customization for FLUX.1-dev.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MusarError as e:
        print(f"musar {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"musar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
