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
from musar.bench.targets import forward_values, judge
from musar.errors import MusarError
from musar.utils.io import atomic_write_json, check_writable


def run_bench(args: argparse.Namespace) -> int:
    out = check_writable(args.out)
    s = settings_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise MusarError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from musar.bench.forward import forward_bench

    t0 = time.perf_counter()
    result: dict[str, Any] = {"schema": SCHEMA, "meta": _meta(s, args)}
    with _sdpa_context(s.sdpa):
        result["forward"], result["routes"] = forward_bench(s)
    result["attention"] = _attention(s) if s.attention else []
    result["targets"] = evaluate_targets(result, s.device)
    result["meta"]["total_s"] = time.perf_counter() - t0
    atomic_write_json(out, result)
    print(format_tables(result))
    print(f"musar bench: wrote {out}", file=sys.stderr)
    return 0


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


def _attention(s: Settings) -> list[dict[str, Any]]:
    from musar.bench.attention import attention_bench
    from musar.models.layout import TokenLayout

    n, nc = (s.height // 16) * (s.width // 16), (s.cond_size // 16) ** 2
    backends = [b for b in ("reference", "fast", "flex") if b in s.modes]
    return [
        attention_bench(
            TokenLayout.uniform(s.prompt_len, n, c, nc, s.phrase_len), heads=s.config["num_attention_heads"],
            head_dim=s.config["attention_head_dim"], device=s.device, dtype=s.dtype, backends=backends,
            warmup=s.warmup, repeats=s.repeats, seed=s.seed,
        )
        for c in s.refs
    ]


def evaluate_targets(result: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The issue's targets that one ``musar bench`` run measures; ``met`` only on CUDA."""
    values = forward_values(result["forward"], result["attention"], result["meta"]["auto_backend"])
    return judge(values, device.type == "cuda")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_tables(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"musar bench  preset={m['preset']}  device={m['device_name']} ({m['device']})  dtype={m['dtype']}  "
             f"{m['height']}x{m['width']}, refs {m['cond_size']}px, sdpa={m['sdpa']}, auto={m['auto_backend']}",
             "", f"{'c':>2} {'mode':<12} {'ms':>10} {'x plain':>8} {'x naive':>8} {'peak MiB':>10}"]
    for r in result["forward"]:
        lines.append(f"{r['c']:>2} {r['mode']:<12} {r['ms']:>10.2f} {_fmt(r.get('ratio_vs_plain'), '8.2f'):>8} "
                     f"{_fmt(r.get('ratio_vs_naive'), '8.2f'):>8} {_fmt(r.get('peak_mib'), '10.0f'):>10}")
    for a in result["attention"]:
        # the flex block share only where a flex kernel ran (its block lists are built anyway)
        flex_ran = any(name in ("routed_flex", "routed_cached_flex") for name in a["ms"])
        blocks = f"{_fmt(a.get('block_kept_fraction'), '.1%')} of flex blocks; " if flex_ran else ""
        lines += ["", f"attention c={a['c']} L={a['L']}  kept {_fmt(a.get('kept_fraction'), '.1%')} of scores, "
                      f"{blocks}fastest unmasked: {a.get('fastest_unmasked', '-')}"]
        ratios = a.get("ratio_vs_fastest_unmasked", {})
        for name, ms in a["ms"].items():
            lines.append(f"   {name:<22} {ms:>9.3f} ms  {_fmt(ratios.get(name), '6.2f'):>6}x")
        for name, err in a["errors"].items():
            lines.append(f"   {name:<22} unavailable: {err[:90]}")
    lines.append("")
    for name, t in result["targets"].items():
        if name != "note":
            unjudged = "not judged" if str(m["device"]).startswith("cuda") else "not judged on CPU"
            met = {True: "met", False: "MISSED", None: unjudged}[t["met"]]
            lines.append(f"target {name:<42} {_fmt(t['value'], '.3f'):>7} (limit {t['limit']})  {met}")
    if "note" in result["targets"]:
        lines.append(result["targets"]["note"])
    return "\n".join(lines)
