"""Arguments declared together with their rules, and the one validation pass that runs them.

``add(parser, "--seed", type=SEED, default=0, help=...)`` is ``parser.add_argument`` with one more
keyword. A value's own rule (a :class:`~musar.utils.validation.Number`, or any ``type=``) runs
while argparse parses, so bad text is argparse's usual one-line error. ``check=`` adds a rule
that needs the file system or the other arguments (the file exists, the output and its sidecar
are writable, the LoRA header is ours, the preset is registered); :func:`validate` runs them in
declaration order. ``musar.cli.main`` calls it after parsing and before the command's ``run``, so
every check of every command precedes any heavy import, model load or output. A failing check
reads like argparse's own: ``musar generate: error: argument --lora: LoRA file not found: x``.

Layout boxes, for instance, plug in as two declarations (``musar.cli.generate``)::

    add(p, "--box", nargs="+", action="append", check=_check_boxes, help=...)
    # _check_boxes(boxes, args): 4 numbers or 'none' each, one per --subject, within [0, 1], ...
    add(p, "--outside-boxes", choices=OUTSIDE_POLICIES, default=DEFAULT_OUTSIDE, check=_check_outside, help=...)

Help answers by itself: a parser built with ``formatter_class=HelpFormatter`` ends every option's
help with its default (``(default: 28)``) or ``(required)``, so no help text repeats a default
by hand and none can go stale.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from musar.errors import MusarError

# The routed-attention backends and the one default of every command that generates, which is
# RoutingOptions' own (musar.models.options imports no torch): the backends compute the same
# function, so the default is the fastest on the machine at hand (docs/validation.md, "Choices",
# says why evaluation uses it too).
from musar.models.options import BACKENDS as ATTENTION_BACKENDS
from musar.models.options import DEFAULT_BACKEND as DEFAULT_ATTENTION
from musar.utils.validation import THREADS

Check = Callable[[Any, argparse.Namespace], None]

_CHECKS = "_musar_checks"  # namespace attribute: [(dest, flag, check), ...] of the chosen command


def add(parser: Any, *flags: str, check: Check | None = None, **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(*flags, **kwargs)`` plus an optional deferred ``check(value, args)``.

    ``parser`` may be an argument group; groups share their parser's defaults, where the checks
    are kept. ``check`` is skipped when the value is ``None`` (an optional argument not given).
    """
    action = parser.add_argument(*flags, **kwargs)
    if check is not None:
        checks = list(parser.get_default(_CHECKS) or [])
        flag = "/".join(action.option_strings) or action.dest  # as argparse names it in its errors
        checks.append((action.dest, flag, check))
        parser.set_defaults(**{_CHECKS: checks})
    return action


def validate(args: argparse.Namespace) -> None:
    """Run the chosen command's deferred checks; the first failure is a one-line MusarError."""
    for dest, flag, check in getattr(args, _CHECKS, ()):
        value = getattr(args, dest, None)
        if value is None:
            continue
        try:
            check(value, args)
        except MusarError as e:
            raise MusarError(f"argument {flag}: {e}") from None


def each(check: Callable[[Any], Any]) -> Check:
    """A deferred check for a list-valued argument (``action="append"`` / ``nargs``): every item."""

    def run(values: Any, args: argparse.Namespace) -> None:
        for value in values:
            check(value)

    return run


def value(check: Callable[[Any], Any]) -> Check:
    """A deferred check that needs only the value, not the other arguments."""
    return lambda v, args: check(v)


def add_attention(parser: Any) -> argparse.Action:
    """``--attention``, declared the same way by every command that generates."""
    return add(
        parser, "--attention", choices=ATTENTION_BACKENDS, default=DEFAULT_ATTENTION,
        help="routed attention backend: auto = flex on CUDA, fast elsewhere; fast = grouped SDPA; "
        "flex = FlexAttention block mask; reference = dense mask (slow) (default: %(default)s)",
    )


def show_default(default: Any) -> str:
    """A default as ``--help`` shows it: lists space-separated (as typed), big integers grouped."""
    if isinstance(default, (list, tuple)):
        return " ".join(show_default(v) for v in default)
    if isinstance(default, int) and not isinstance(default, bool) and abs(default) >= 10_000:
        return f"{default:,}"
    return str(default)


def shows_default(action: argparse.Action) -> bool:
    """Whether ``--help`` states this option's default: it has one (not None, not an empty list),
    and takes a value (a switch's default is always off)."""
    default = action.default
    if default is None or default is argparse.SUPPRESS or (isinstance(default, (list, tuple)) and not default):
        return False
    return bool(action.option_strings) and action.nargs != 0


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with every option's help ending in ``(required)`` or its default.

    A help text that already says its default (``%(default)s``, or the word "default") is left
    as it is; ``tests/test_cli_help.py`` checks that the value is there all the same.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.required:
            return text if "(required)" in text else f"{text} (required)".strip()
        if shows_default(action) and "%(default)" not in text and "default" not in text.lower():
            text = f"{text} (default: {show_default(action.default).replace('%', '%%')})".strip()
        return text


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def default_threads() -> int:
    """``--threads``' default: ``$OMP_NUM_THREADS`` when set (the user's own choice), else
    min(available CPUs, 4), which does not oversubscribe a small or shared machine."""
    try:
        env = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        env = 0
    if 1 <= env <= THREADS.hi:  # type: ignore[operator]
        return env
    return min(available_cpus(), 4)


def add_threads(parser: Any) -> argparse.Action:
    """``--threads``, declared the same way by every command that generates."""
    return add(
        parser, "--threads", type=THREADS, default=default_threads(), metavar="N",
        help=f"CPU threads for torch, intra-op (and inter-op where it can still be set); {THREADS.describe()} "
        "(default: %(default)s = $OMP_NUM_THREADS when set, else min(CPUs available to this process, 4))",
    )


@contextmanager
def torch_threads(threads: int) -> Iterator[dict[str, int]]:
    """Run with ``threads`` intra-op torch threads (restored after) and, where torch still
    allows it (before any inter-op work in this process), as many inter-op threads.

    Yields what is in force, ``{"threads": N, "interop_threads": M}``, for the sidecar.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    with suppress(RuntimeError):  # settable once per process, before inter-op work starts: else keep it
        torch.set_num_interop_threads(threads)
    try:
        yield {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
    finally:
        torch.set_num_threads(before)
