"""The gates of issue 14, measured on held-out identities, each number with its standard error.

0. base text-to-image competence: full captions, no references; shape, body colour, pattern and
   pattern colour >= 0.90 on single-subject scenes and >= 0.80 per subject on two-subject scenes;
1. base grounding: routing accuracy of the base's own S* in text-only generation of two-subject
   scenes (brief MUSAR prompts), late half of the steps: >= 0.90 different shapes, >= 0.85 same;
2. single-subject customization: body colour >= 0.95, pattern >= 0.85, pattern colour >= 0.85;
3. two subjects, full model: routing accuracy >= 0.90, both present >= 0.60, entanglement <= 0.05.

:func:`base_gates` measures 0 and 1 (and the pooled-shortcut probe) on a base;
:func:`check` compares measured numbers with the thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from musar.pipelines.pipeline_musar import MusarPipeline
from musar.toy import probes
from musar.toy.cases import make_cases
from musar.toy.metrics import fmt

Rates = dict[str, tuple[float, float]]

# (gate, measured key, comparison, threshold)
THRESHOLDS: tuple[tuple[str, str, str, float], ...] = (
    *(("0", f"single.{a}", ">=", 0.90) for a in ("shape", "body_colour", "pattern", "pattern_colour")),
    *(("0", f"two.{a}", ">=", 0.80) for a in ("shape", "body_colour", "pattern", "pattern_colour")),
    ("1", "grounding.all_different", ">=", 0.90),
    ("1", "grounding.all_same", ">=", 0.85),
    ("2", "custom1.body_colour", ">=", 0.95),
    ("2", "custom1.pattern", ">=", 0.85),
    ("2", "custom1.pattern_colour", ">=", 0.85),
    ("3", "custom2.routing_all_different", ">=", 0.90),
    ("3", "custom2.routing_all_same", ">=", 0.90),
    ("3", "custom2.all_present", ">=", 0.60),
    ("3", "custom2.entanglement", "<=", 0.05),
)


def base_gates(
    pipe: MusarPipeline, singles: int = 48, twos: int = 24, seeds: Sequence[int] = (0, 1), pooled: bool = True
) -> dict[str, Rates]:
    """Gates 0 and 1 on ``singles`` one-subject and ``twos`` two-subject held-out cases x seeds."""
    single_cases = make_cases(singles, subjects=1)
    two_cases = make_cases(twos)
    out = {
        "single": probes.text_to_image(pipe, single_cases, seeds)[0],
        "two": probes.text_to_image(pipe, two_cases, seeds)[0],
        "grounding": probes.grounding(pipe, two_cases, seeds, brief=True),
        "grounding_full": probes.grounding(pipe, two_cases, seeds, brief=False),
    }
    out["identity"] = probes.identity_prior(pipe, single_cases, seeds[:1])
    if pooled:
        out["pooled"] = probes.pooled_shortcut(pipe, single_cases, seeds[:1])
    return out


def lookup(results: dict[str, Rates], key: str) -> tuple[float, float]:
    group, name = key.split(".", 1)
    return results.get(group, {}).get(name, (math.nan, math.nan))


def check(results: dict[str, Rates]) -> list[tuple[str, str, str, bool | None]]:
    """(gate, key, 'measured vs threshold', passed or None if not measured) per threshold."""
    rows = []
    for gate, key, op, threshold in THRESHOLDS:
        value = lookup(results, key)
        if math.isnan(value[0]):
            rows.append((gate, key, "not measured", None))
            continue
        ok = value[0] >= threshold if op == ">=" else value[0] <= threshold
        rows.append((gate, key, f"{fmt(value)} (needs {op} {threshold:.2f})", ok))
    return rows


def summary_line(results: dict[str, Rates]) -> str:
    """A compact one-line digest for training logs."""
    parts = []
    for group in ("single", "two"):
        if group in results:
            r = results[group]
            parts.append(group + " " + "/".join(f"{r[a][0]:.2f}" for a in ("shape", "body_colour", "pattern", "pattern_colour"))
                         + (f" clean {r['clean'][0]:.2f}" if "clean" in r else ""))
    for group in ("grounding", "grounding_full"):
        if group in results:
            r = results[group]
            layers = " ".join(f"{r[k][0]:.2f}" for k in sorted(r) if k.startswith("L") and "_" not in k)
            parts.append(f"{group} diff {r['all_different'][0]:.2f} same {r['all_same'][0]:.2f} [{layers}]")
    if "identity" in results:
        r = results["identity"]
        parts.append("identity-copied " + "/".join(f"{r.get(a + '_copied', (math.nan,))[0]:.2f}" for a in ("body_colour", "pattern", "pattern_colour"))
                     + f" all {r.get('identity_copied', (math.nan,))[0]:.2f}")
    if "pooled" in results:
        r = results["pooled"]
        parts.append("pooled-follow " + "/".join(f"{r[a + '_pooled'][0]:.2f}" for a in ("shape", "body_colour", "background")))
    return "; ".join(parts)
