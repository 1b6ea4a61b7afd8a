"""The ``musar bench`` run: MUSAR's forward and attention speed against plain FLUX, in one run.

Per number of references c: plain diffusers ``FluxTransformer2DModel`` (c = 0, the baseline),
naive concatenation without a mask, MUSAR with each attention backend, MUSAR with dynamic
routing off (to isolate its overhead), with ``independent_conditions`` and with the condition
K/V cache; then an attention-only microbenchmark (:mod:`musar.bench.attention`). Speed does not
depend on trained weights, so ``flux-dev-random`` is the FLUX.1-dev architecture with random
weights made on the device; ``tiny`` is a seconds-long CPU smoke test. bench/README.md says
what every field means.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch

from musar.bench.settings import SCHEMA, Settings, settings_from_args
from musar.bench.targets import format_targets, forward_values, judge
from musar.errors import MusarError
from musar.utils.io import atomic_write_json, check_writable


def run_bench(args: argparse.Namespace) -> int:
    out = check_writable(args.out) if args.out else None  # before minutes of work, not after
    s = settings_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise MusarError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from musar.bench.forward import forward_bench, planned_rows

    t0 = time.perf_counter()
    result: dict[str, Any] = {"schema": SCHEMA, "meta": _meta(s, args)}
    plan = planned_rows(s)
    with _progress(len(plan) + (len(s.refs) if s.attention else 0)) as bar:

        def done(rows: list[dict[str, Any]]) -> None:
            bar.set_postfix_str(_label(plan, len(rows)), refresh=False)  # one redraw, already naming the next
            bar.update(1)

        bar.set_postfix_str(_label(plan, 0))
        with _sdpa_context(s.sdpa):
            result["forward"], result["routes"] = forward_bench(s, on_row=done)
        result["attention"] = _attention(s, bar) if s.attention else []
    result["targets"] = evaluate_targets(result, s.device)
    result["meta"]["total_s"] = time.perf_counter() - t0
    if out is not None:
        atomic_write_json(out, result)
    print(format_tables(result))
    print(f"musar bench: wrote {out}" if out else "musar bench: printed only, nothing written (--out FILE.json keeps "
          "every timed call)", file=sys.stderr)
    return 0


def _progress(total: int) -> Any:
    """A bar on stderr while it runs; off where stderr is no terminal (tqdm's own rule), so logs
    and the GPU suite's suite.log get no carriage-return noise."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="musar bench", unit="run", disable=None, leave=False, dynamic_ncols=True)


def _label(plan: list[tuple[int, str]], done: int) -> str:
    """What runs next (the bar shows it while that measurement is under way)."""
    return f"forward c={plan[done][0]} {plan[done][1]}" if done < len(plan) else ""


def _sdpa_context(name: str) -> Any:
    if name == "default":
        return nullcontext()
    from torch.nn.attention import sdpa_kernel

    from musar.bench.attention import SDPA_KERNELS

    return sdpa_kernel(SDPA_KERNELS[name])


def _meta(s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    from musar.models.options import resolve_backend

    dev = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else _cpu_name()
    n, nc = (s.height // 16) * (s.width // 16), (s.cond_size // 16) ** 2
    return {
        "preset": s.preset, "device": str(s.device), "device_name": dev, "dtype": str(s.dtype).replace("torch.", ""),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "height": s.height, "width": s.width, "cond_size": s.cond_size,
        "tokens": {"prompt": s.prompt_len, "noise": n, "cond_image": nc, "cond_text": s.phrase_len},
        "refs": s.refs, "modes": s.modes, "repeats": s.repeats, "warmup": s.warmup, "sdpa": s.sdpa,
        "auto_backend": resolve_backend("auto", s.device), "threads": torch.get_num_threads(),
        "argv": [a for a in sys.argv[1:]] or None, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in s.config.items()},
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _attention(s: Settings, bar: Any) -> list[dict[str, Any]]:
    from musar.bench.attention import attention_bench
    from musar.models.layout import TokenLayout

    n, nc = (s.height // 16) * (s.width // 16), (s.cond_size // 16) ** 2
    backends = [b for b in ("reference", "fast", "flex") if b in s.modes]
    entries = []
    for c in s.refs:
        bar.set_postfix_str(f"attention c={c}")
        entries.append(attention_bench(
            TokenLayout.uniform(s.prompt_len, n, c, nc, s.phrase_len), heads=s.config["num_attention_heads"],
            head_dim=s.config["attention_head_dim"], device=s.device, dtype=s.dtype, backends=backends,
            warmup=s.warmup, repeats=s.repeats, seed=s.seed,
        ))
        bar.update(1)
    return entries


def evaluate_targets(result: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The issue's targets that one ``musar bench`` run measures; ``met`` only on CUDA."""
    values = forward_values(result["forward"], result["attention"], result["meta"]["auto_backend"])
    return judge(values, device.type == "cuda")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# A call this much slower than its row's median is shown as such: the median alone would hide it.
OUTLIER = 2.0


def _timed(median: float, sp: dict[str, Any], spec: str) -> tuple[str, bool]:
    wild = sp["ms_max"] > OUTLIER * median
    cells = f"{median:>10{spec}} {sp['ms_min']:>9{spec}} {sp['ms_max']:>9{spec}} {sp['n']:>3}{'*' if wild else ' '}"
    return cells, wild


def format_tables(result: dict[str, Any]) -> str:
    """The printed report: only rows that were measured, each with its median, min, max and n."""
    m = result["meta"]
    cuda = str(m["device"]).startswith("cuda")
    lines = [f"musar bench  preset={m['preset']}  device={m['device_name']} ({m['device']})  dtype={m['dtype']}  "
             f"{m['height']}x{m['width']}, refs {m['cond_size']}px, sdpa={m['sdpa']}, auto={m['auto_backend']}",
             f"times in ms: per row {m['warmup']} untimed calls, then n timed ones: their median, min and max", ""]
    rows = result["forward"]
    peak = any(r.get("peak_mib") is not None for r in rows)  # a column only where memory was measured
    lines.append(f"{'c':>2} {'mode':<12} {'median ms':>10} {'min':>9} {'max':>9} {'n':>3}  {'x plain':>8} {'x naive':>8}"
                 + (f" {'peak MiB':>10}" if peak else ""))
    wild_any = False
    for r in rows:
        cells, wild = _timed(r["ms"], r, ".2f")
        wild_any |= wild
        lines.append(f"{r['c']:>2} {r['mode']:<12} {cells} {_fmt(r.get('ratio_vs_plain'), '8.2f'):>8} "
                     f"{_fmt(r.get('ratio_vs_naive'), '8.2f'):>8}" + (f" {_fmt(r.get('peak_mib'), '10.0f'):>10}" if peak else ""))
    for a in result["attention"]:
        # the flex block share only where a flex kernel ran (the JSON has it only then, too)
        blocks = f", {_fmt(a.get('block_kept_fraction'), '.1%')} of flex blocks" if "block_kept_fraction" in a else ""
        kept = f"kept {_fmt(a.get('kept_fraction'), '.1%')} of scores{blocks}; " if "kept_fraction" in a else ""
        fastest = a.get("fastest_unmasked")
        lines += ["", f"attention c={a['c']} L={a['L']}  {kept}fastest unmasked: {fastest or '-'}",
                  f"   {'call':<22} {'median ms':>10} {'min':>9} {'max':>9} {'n':>3}  {'x fastest':>9}"]
        base = a["ms"].get(fastest) if fastest else None
        for name, ms in a["ms"].items():
            cells, wild = _timed(ms, a["spread"][name], ".3f")
            wild_any |= wild
            lines.append(f"   {name:<22} {cells} {_fmt(ms / base if base else None, '9.2f'):>9}")
        for name, err in a["errors"].items():
            lines.append(f"   {name:<22} unavailable: {err[:90]}")
    if wild_any:
        lines += ["", f"* one call took over {OUTLIER:g}x its row's median (a late compile, a busy machine); the median "
                      "holds, more --warmup / --repeats narrow min-max"]
    return "\n".join([*lines, "", *format_targets(result["targets"], cuda)])
