"""The gates of issue 14, measured on held-out identities, each number with its standard error.

0. base text-to-image competence: full captions, no references; shape, body colour, pattern and
   pattern colour >= 0.90 on single-subject scenes and >= 0.80 per subject on two-subject scenes;
1. base grounding: routing accuracy of the base's own S* in text-only generation of two-subject
   scenes (brief MUSAR prompts), late half of the steps: >= 0.90 different shapes, >= 0.85 same;
2. single-subject customization: body colour >= 0.95, pattern >= 0.85, pattern colour >= 0.85;
3. two subjects, full model: routing accuracy >= 0.90, both present >= 0.60, entanglement <= 0.05;
4. scale (issue 21): the base draws three and four subjects from full captions (clean presence
   and every attribute >= 0.90) and grounds them (>= 0.90); MUSAR trained at c <= 2 composes
   them (all present >= 0.70 at c = 3, >= 0.50 at c = 4) with entanglement <= 0.05 and routing
   >= 0.90 at every c.

A gate measured over several training seeds holds only if it holds in every seed
(:func:`check` takes the worst seed).

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
    *(("4", f"{g}.{a}", ">=", 0.90) for g in ("three", "four")
      for a in ("all_present_strict", "shape", "body_colour", "pattern", "pattern_colour")),
    ("4", "grounding3.all", ">=", 0.90),
    ("4", "grounding4.all", ">=", 0.90),
    ("4", "custom3.all_present", ">=", 0.70),
    ("4", "custom4.all_present", ">=", 0.50),
    *(("4", f"custom{c}.entanglement", "<=", 0.05) for c in (3, 4)),
    *(("4", f"custom{c}.routing_all", ">=", 0.90) for c in (3, 4)),
)
SCALE_COUNTS = (3, 4)  # subject counts the scale gates measure (gate 4)


def base_gates(
    pipe: MusarPipeline, singles: int = 48, twos: int = 24, seeds: Sequence[int] = (0, 1), pooled: bool = True,
    scale_cases: int | None = None,
) -> dict[str, Rates]:
    """Gates 0 and 1 on ``singles`` one-subject and ``twos`` two-subject held-out cases x seeds,
    and the base's part of gate 4 on ``scale_cases`` (default ``twos``) three- and four-subject
    cases."""
    single_cases = make_cases(singles, subjects=1)
    two_cases = make_cases(twos)
    out = {
        "single": probes.text_to_image(pipe, single_cases, seeds)[0],
        "two": probes.text_to_image(pipe, two_cases, seeds)[0],
        "grounding": probes.grounding(pipe, two_cases, seeds, brief=True),
        "grounding_full": probes.grounding(pipe, two_cases, seeds, brief=False),
    }
    for count, name in zip(SCALE_COUNTS, ("three", "four"), strict=True):
        cases = make_cases(twos if scale_cases is None else scale_cases, subjects=count)
        out[name] = probes.text_to_image(pipe, cases, seeds)[0]
        out[f"grounding{count}"] = probes.grounding(pipe, cases, seeds, brief=True)
    out["identity"] = probes.identity_prior(pipe, single_cases, seeds[:1])
    if pooled:
        out["pooled"] = probes.pooled_shortcut(pipe, single_cases, seeds[:1])
    return out


def lookup(results: dict[str, Rates], key: str) -> tuple[float, float]:
    group, name = key.split(".", 1)
    return results.get(group, {}).get(name, (math.nan, math.nan))


def check(
    results: dict[str, Rates], per_seed: dict[str, list[Rates]] | None = None
) -> list[tuple[str, str, str, bool | None]]:
    """(gate, key, 'measured vs threshold', passed or None if not measured) per threshold.

    ``per_seed``: for groups measured on several training seeds, each seed's rates; the gate then
    holds only if every seed passes, and the text names the worst seed."""
    rows = []
    for gate, key, op, threshold in THRESHOLDS:
        group = key.split(".", 1)[0]
        seeds = [lookup({group: r}, key) for r in (per_seed or {}).get(group, [])]
        value = lookup(results, key)
        if math.isnan(value[0]):
            rows.append((gate, key, "not measured", None))
            continue
        passes = [(v[0] >= threshold if op == ">=" else v[0] <= threshold) for v in (seeds or [value])]
        text = f"{fmt(value)} (needs {op} {threshold:.2f})"
        if len(seeds) > 1:
            text += f"; seeds {' / '.join(f'{v[0]:.2f}' for v in seeds)}"
        rows.append((gate, key, text, all(passes)))
    return rows


def summary_line(results: dict[str, Rates]) -> str:
    """A compact one-line digest for training logs."""
    parts = []
    for group in ("single", "two", "three", "four"):
        if group in results:
            r = results[group]
            parts.append(group + " " + "/".join(f"{r[a][0]:.2f}" for a in ("shape", "body_colour", "pattern", "pattern_colour"))
                         + (f" clean {r['clean'][0]:.2f}" if "clean" in r else ""))
    for group in ("grounding", "grounding_full", "grounding3", "grounding4"):
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
