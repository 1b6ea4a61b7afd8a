"""The issue's speed and memory targets, judged from benchmark JSON (pure functions, no torch).

Every target is a ratio or an amount measured side by side in one run, with its limit. ``met`` is
judged only for CUDA runs (``None`` on CPU, where the numbers say nothing about a GPU); a target
whose measurement is missing (a part failed or was not run) has ``value`` None and ``met`` None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    name: str
    limit: float
    what: str


TARGETS: tuple[Target, ...] = (
    Target("attention_routed_vs_fastest_unmasked_c2", 1.0, "routed attention call at c = 2 / fastest unmasked SDPA kernel"),
    Target("attention_routed_vs_fastest_unmasked_c4", 0.85, "routed attention call at c = 4 / fastest unmasked SDPA kernel"),
    Target("forward_fast_vs_naive_c2", 0.9, "MUSAR forward with the fast backend at c = 2 / naive concatenation"),
    Target("forward_auto_vs_naive_c2", 0.9, "MUSAR forward with the auto backend at c = 2 / naive concatenation"),
    Target("dynamic_routing_overhead_c2", 0.03, "auto-backend forward / static-only forward - 1, at c = 2"),
    Target("cached_vs_plain_c2", 1.10, "cached forward (independent conditions) at c = 2 / plain FLUX"),
    Target("peak_memory_vs_naive_c2", 1.02, "peak memory of the auto-backend forward / naive concatenation, c = 2"),
    Target("train_step_musar_vs_concat", 1.10, "training step time, MUSAR at c = 2 / concatenation"),
    Target("train_step_musar_peak_gb", 30.0, "peak GPU memory of the MUSAR training step, GB"),
    Target("generate_28_steps_1024_c2_s", 6.0, "end-to-end 28-step generation at 1024x1024, c = 2, eager, seconds (H200)"),
    Target("quantized_pipeline_peak_gb", 16.0, "lowest pipeline peak over the quantisation modes at 1024x1024, c = 2, GB"),
)


def _row(forward: list[dict[str, Any]], c: int, mode: str) -> dict[str, Any] | None:
    return next((r for r in forward if r.get("c") == c and r.get("mode") == mode), None)


def _ratio(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None, key: str = "ms") -> float | None:
    return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None


def forward_values(forward: list[dict[str, Any]], attention: list[dict[str, Any]], auto: str) -> dict[str, float | None]:
    """Targets of ``musar bench`` (forward rows and attention entries of one run)."""
    att = {a["c"]: a for a in attention}

    def routed(c: int) -> float | None:
        return att.get(c, {}).get("ratio_vs_fastest_unmasked", {}).get(f"routed_{auto}")

    dyn = _ratio(_row(forward, 2, auto), _row(forward, 2, "static_only"))
    return {
        "attention_routed_vs_fastest_unmasked_c2": routed(2),
        "attention_routed_vs_fastest_unmasked_c4": routed(4),
        "forward_fast_vs_naive_c2": _ratio(_row(forward, 2, "fast"), _row(forward, 2, "naive")),
        "forward_auto_vs_naive_c2": _ratio(_row(forward, 2, auto), _row(forward, 2, "naive")),
        "dynamic_routing_overhead_c2": None if dyn is None else dyn - 1.0,
        "cached_vs_plain_c2": _ratio(_row(forward, 2, "cached"), _row(forward, 0, "plain")),
        "peak_memory_vs_naive_c2": _ratio(_row(forward, 2, auto), _row(forward, 2, "naive"), "peak_mib"),
    }


def train_values(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    by = {r["variant"]: r for r in rows}
    musar, concat = by.get("musar"), by.get("concat")
    peak = musar.get("peak_gib") if musar else None
    return {
        "train_step_musar_vs_concat": _ratio(musar, concat, "s_per_step"),
        "train_step_musar_peak_gb": None if peak is None else peak * 2**30 / 1e9,
    }


def judge(values: Mapping[str, float | None], cuda: bool) -> dict[str, Any]:
    """``{name: {value, limit, met, what}}`` for the targets present in ``values``."""
    out: dict[str, Any] = {}
    for t in TARGETS:
        if t.name in values:
            v = values[t.name]
            out[t.name] = {"value": v, "limit": t.limit, "met": (v <= t.limit) if cuda and v is not None else None, "what": t.what}
    if not cuda:
        out["note"] = "CPU run: the targets are for a GPU in bf16 and are not judged here"
    return out


def format_targets(targets: Mapping[str, Any], cuda: bool) -> list[str]:
    """One line per measured target, in the words every bench command uses; the targets this run
    could not measure (a c or a mode it did not run, memory on a CPU) are named once, not as rows."""
    unjudged = "not judged" if cuda else "not judged on CPU"
    lines, missing = [], []
    for name, t in targets.items():
        if name == "note":
            continue
        if t["value"] is None:
            missing.append(name)
            continue
        verdict = {True: "met", False: "MISSED", None: unjudged}[t["met"]]
        lines.append(f"target {name:<42} {t['value']:>7.3f} (limit {t['limit']})  {verdict}")
    if missing:
        lines.append("not measured in this run: " + ", ".join(missing))
    if "note" in targets:
        lines.append(targets["note"])
    return lines
