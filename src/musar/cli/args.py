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
    add(p, "--outside-boxes", choices=["all", "none"], default="all", check=_check_outside, help=...)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from musar.errors import MusarError

Check = Callable[[Any, argparse.Namespace], None]

# The routed-attention backends of musar.models.routing.BACKENDS (that module imports torch, so a
# test keeps the two equal) and the one default of every command that generates, which is
# RoutingOptions' own: the backends compute the same function, so the default is the fastest on
# the machine at hand (docs/validation.md, "Choices", says why evaluation uses it too).
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "fast", "flex", "reference")
DEFAULT_ATTENTION = "auto"
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
        help="routed attention backend: auto = flex on CUDA, fast elsewhere (default); fast = grouped SDPA; "
        "flex = FlexAttention block mask; reference = dense mask (slow)",
    )
