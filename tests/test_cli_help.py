"""`--help` answers: every option of every subcommand says what it does and what it defaults to.

Uses the parser objects (musar.cli.build_parser), not subprocesses, except for the one check that
`--help` imports no model stack. Every subcommand is walked, `musar toy` included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from musar.cli import SUBCOMMANDS, build_parser
from musar.cli.args import available_cpus, default_threads, show_default, shows_default, torch_threads

COMMANDS = list(SUBCOMMANDS)


def _parsers(parser: argparse.ArgumentParser, prog: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every parser below it (``eval compare``, ``data preview``, ...)."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{prog} {name}")


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    top = build_parser(COMMANDS)
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return [found for name in COMMANDS for found in _parsers(sub.choices[name], name)]


PARSERS = _all_parsers()


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(("prog", "parser"), PARSERS, ids=[prog for prog, _ in PARSERS])
def test_every_option_has_help_with_its_default_or_required(prog: str, parser: argparse.ArgumentParser) -> None:
    page = _flat(parser.format_help())
    formatter = parser._get_formatter()
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert actions or prog == "eval compare", prog
    for action in actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"musar {prog} {name} has no help text"
        shown = _flat(formatter._expand_help(action))  # the option's help as --help prints it
        assert shown.replace(" ", "") in page.replace(" ", ""), f"musar {prog} {name}: help not in the page"  # wraps
        if action.option_strings and action.required:
            assert "(required)" in shown, f"musar {prog} {name} is required but not marked: {shown!r}"
        elif shows_default(action):
            assert show_default(action.default) in shown, f"musar {prog} {name}: default {action.default!r} not in {shown!r}"
        elif action.option_strings and action.nargs != 0 and action.default is not None and action.default != []:
            pytest.fail(f"musar {prog} {name}: default {action.default!r} would not be shown")


def test_defaults_read_as_typed() -> None:
    assert show_default([0, 1, 2, 3]) == "0 1 2 3"
    assert show_default(50_000_000) == "50,000,000"
    assert show_default(3.5) == "3.5" and show_default("auto") == "auto" and show_default(7860) == "7860"


def test_generation_flags_left_out_say_whose_default_they_take() -> None:
    (generate,) = [p for prog, p in PARSERS if prog == "generate"]
    page = _flat(generate.format_help())
    for flag, flux in (("--steps", "28"), ("--height", "1024"), ("--condition-size", "512"),
                       ("--phrase-tokens", "32"), ("--max-sequence-length", "512"), ("--guidance", "3.5")):
        assert f"{flag} " in page
        assert f"(default: the preset's, else FLUX's {flux})" in page
    assert "(default: auto)" in page and "--threads N" in page


def test_metric_model_defaults_in_help_are_the_real_ones() -> None:
    from musar.eval.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL

    (ev,) = [p for prog, p in PARSERS if prog == "eval"]
    page = _flat(ev.format_help())
    assert f"(default: {DEFAULT_DINO_MODEL})" in page and f"(default: {DEFAULT_CLIP_MODEL})" in page


@pytest.mark.parametrize("command", ["generate", "eval", "ui"])
def test_threads_flag_defaults_to_a_share_of_this_machine(command: str) -> None:
    (parser,) = [p for prog, p in PARSERS if prog == command]
    (threads,) = [a for a in parser._actions if "--threads" in a.option_strings]
    assert threads.default == default_threads() >= 1


def test_default_threads_does_not_oversubscribe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == min(available_cpus(), 4)
    if hasattr(os, "sched_getaffinity"):
        assert available_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own choice wins
    assert default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert default_threads() == min(available_cpus(), 4)


def test_torch_threads_applies_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1) as used:
        assert torch.get_num_threads() == 1 == used["threads"] and used["interop_threads"] >= 1
    assert torch.get_num_threads() == before


def test_help_imports_no_model_stack() -> None:
    code = f"""
import json, sys
from musar.cli import main
for command in {COMMANDS!r}:
    try:
        main([command, "--help"])
    except SystemExit:
        pass
print(json.dumps([m for m in ("torch", "diffusers", "transformers", "gradio", "datasets") if m in sys.modules]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
