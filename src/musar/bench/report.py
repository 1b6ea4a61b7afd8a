"""Markdown tables of a GPU-suite run (the folder :mod:`musar.bench.suite` writes), ready to paste
into bench/README.md. Missing parts or fields print as '-'; nothing here imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from musar.bench.targets import TARGETS
from musar.errors import MusarError
from musar.utils.safe_load import read_json


def _load(path: Path) -> dict[str, Any]:
    try:  # our own files; a missing or damaged one (a part killed mid-write) reads as empty
        return read_json(path, expect=dict)
    except MusarError:
        return {}


def _f(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def format_report(out: Path) -> str:
    summary = _load(out / "summary.json")
    meta = summary.get("meta", {})
    versions = meta.get("versions", {})
    lines = [f"## GPU suite: {meta.get('device_name', '?')} ({summary.get('size', '?')} size), "
             f"torch {versions.get('torch', '?')}, diffusers {versions.get('diffusers', '?')}, "
             f"{_f(summary.get('total_s'), '.0f')} s of {_f(summary.get('budget_s'), '.0f')} s", ""]
    parts = summary.get("parts", {})
    order = [n for n in summary.get("order", []) if n in parts] or list(parts)
    lines += _table(["part", "status", "wall s", "box s", "why not ok"],
                    [[n, parts[n].get("status", "-"), _f(parts[n].get("wall_s"), ".0f"), _f(parts[n].get("box_s"), ".0f"),
                      (parts[n].get("error") or "")[:120]] for n in order])
    judged = summary.get("targets", {})
    targets = {t.name: judged[t.name] for t in TARGETS if t.name in judged}
    lines += ["", *_table(["target", "value", "limit", "verdict"],
                          [[n, _f(t["value"], ".3f"), str(t["limit"]), {True: "met", False: "MISSED", None: "not judged"}[t["met"]]]
                           for n, t in targets.items()])]
    if "note" in summary.get("targets", {}):
        lines += ["", summary["targets"]["note"]]
    forward = _load(out / "forward.json").get("results", {})
    auto = forward.get("auto_backend")
    bf16 = next((r["ms"] for r in forward.get("forward", []) if r["c"] == 2 and r["mode"] == auto), None)
    for name, fn in (("forward", _forward), ("attention", _attention), ("train_step", _train),
                     ("generate", _generate), ("quantization", lambda r: _quantization(r, bf16)), ("pytest", _pytest)):
        res = _load(out / f"{name}.json").get("results")
        if res:
            lines += ["", f"### {name}", "", *fn(res)]
    return "\n".join(lines)


def _spread(sp: dict[str, Any], spec: str, unit: str = "ms") -> list[str]:
    """min, max and n beside every median (files from before they were recorded show '-')."""
    return [_f(sp.get(f"{unit}_min"), spec), _f(sp.get(f"{unit}_max"), spec), _f(sp.get("n"), "d")]


def _forward(res: dict[str, Any]) -> list[str]:
    return _table(["c", "mode", "median ms", "min", "max", "n", "x plain", "x naive", "peak MiB"],
                  [[str(r["c"]), r["mode"], _f(r["ms"]), *_spread(r, ".2f"), _f(r.get("ratio_vs_plain")),
                    _f(r.get("ratio_vs_naive")), _f(r.get("peak_mib"), ".0f")] for r in res.get("forward", [])])


def _attention(res: dict[str, Any]) -> list[str]:
    rows = []
    for a in res.get("attention", []):
        base = a.get("ms", {}).get(a.get("fastest_unmasked", ""))  # as musar bench prints it: every call, not only routed
        for name, ms in a.get("ms", {}).items():
            rows.append([str(a["c"]), str(a["L"]), name, _f(ms, ".3f"), *_spread(a.get("spread", {}).get(name, {}), ".3f"),
                         _f(ms / base if base else None), _f(a.get("kept_fraction"), ".1%")])
        rows += [[str(a["c"]), str(a["L"]), name, "unavailable", "", "", "", err[:60], ""]
                 for name, err in a.get("errors", {}).items()]
    return _table(["c", "L", "call", "median ms", "min", "max", "n", "x fastest unmasked", "kept"], rows)


def _train(res: dict[str, Any]) -> list[str]:
    return _table(["variant", "median s/step", "min", "max", "n", "peak GiB", "MFU", "loss"],
                  [[r["variant"], _f(r["s_per_step"], ".3f"), *_spread(r, ".3f", "s"), _f(r.get("peak_gib")),
                    _f(r.get("mfu"), ".1%"), _f(r.get("loss"), ".4f")] for r in res.get("rows", [])])


def _generate(res: dict[str, Any]) -> list[str]:
    g, w = res.get("generate", {}), res.get("weights_gib", {})
    return _table(["steps", "size", "seconds", "encode s", "denoise s", "peak GB", "weights GiB (transformer / T5 / CLIP / VAE)"],
                  [[str(g.get("steps", "-")), f"{res.get('height')}x{res.get('width')}, c = {res.get('c')}", _f(g.get("seconds")),
                    _f(g.get("encode_s")), _f(g.get("denoise_s")), _f(g.get("peak_gb")),
                    " / ".join(_f(w.get(k), ".3g") for k in ("transformer", "text_encoder_2", "text_encoder", "vae"))]])


def _quantization(res: dict[str, Any], bf16_ms: float | None) -> list[str]:
    """One row per mode; ``x bf16`` against the unquantised c = 2 forward: this part's ``none`` row
    if it ran one, else the forward part's row of the same shape and backend."""
    modes = res.get("modes", [])
    none = next((m for m in modes if m["mode"] == "none" and m.get("status") == "ok"), None)
    base_ms = none["forward_ms"] if none else bf16_ms
    rows = []
    for m in modes:
        if m.get("status") != "ok":
            rows.append([m["mode"], m.get("status", "-"), (m.get("reason") or m.get("error") or "")[:80], "", "", "", "", "", ""])
            continue
        w, g = m["weights_gib"], m["generate"]
        ratio = m["forward_ms"] / base_ms if base_ms else None
        span = f"{_f(m.get('forward_ms_min'), '.1f')}-{_f(m.get('forward_ms_max'), '.1f')} (n = {m.get('forward_n', '-')})"
        rows.append([m["mode"], "ok", _f(w["transformer"], ".3g"), _f(w["text_encoder_2"], ".3g"), _f(m["forward_ms"], ".1f"), span,
                     _f(ratio), _f(g.get("peak_gb")), _f(m.get("load_s"), ".0f")])
    return _table(["mode", "status", "transformer GiB", "T5 GiB", "forward ms (c = 2)", "min-max", "x bf16", "pipeline peak GB",
                   "load s"], rows)


def _pytest(res: dict[str, Any]) -> list[str]:
    counts = res.get("counts", {})
    lines = [f"exit code {res.get('exit_code', '-')}: " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items())]
    lines += [f"- {t}: {res.get('tests', {}).get(t, '?')} {r}" for t, r in res.get("reasons", {}).items()]
    return lines
