"""``musar bench``: MUSAR's forward and attention speed against plain FLUX, in one run.

Per number of references c: plain diffusers ``FluxTransformer2DModel`` (c = 0, the baseline),
naive concatenation without a mask, MUSAR with each attention backend, MUSAR with dynamic
routing off (to isolate its overhead), with ``independent_conditions`` and with the condition
K/V cache; then an attention-only microbenchmark (:mod:`musar.bench_attention`). Speed does not
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
from dataclasses import dataclass, field
from typing import Any

import torch

from musar.errors import MusarError
from musar.io import atomic_write_json, check_writable

SCHEMA = "musar.bench/1"
MODES = ("plain", "naive", "reference", "fast", "flex", "static_only", "independent", "cached")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class BenchPreset:
    config: dict[str, Any]
    dtype: str
    device: str
    height: int
    width: int
    cond_size: int
    prompt_len: int
    phrase_len: int
    refs: tuple[int, ...]
    repeats: int
    warmup: int


FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
TINY_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
    "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),
}
PRESETS: dict[str, BenchPreset] = {
    "flux-dev-random": BenchPreset(FLUX_DEV_CONFIG, "bf16", "cuda", 1024, 1024, 512, 512, 32, (0, 1, 2, 3, 4), 10, 3),
    "tiny": BenchPreset(TINY_CONFIG, "fp32", "cpu", 128, 128, 64, 16, 4, (0, 1, 2), 3, 1),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time MUSAR's forward and routed attention against plain FLUX")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model (default: flux-dev-random with CUDA, else tiny)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: the preset's)")
    p.add_argument("--refs", type=int, nargs="+", default=None, help="numbers of references c to run (0 = plain FLUX)")
    p.add_argument("--height", type=int, default=None, help="output height in pixels (16 px per token)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--cond-size", type=int, default=None, help="square reference size in pixels")
    p.add_argument("--prompt-len", type=int, default=None, help="main prompt tokens (FLUX: 512)")
    p.add_argument("--phrase-len", type=int, default=None, help="tokens per subject phrase (default 32)")
    p.add_argument("--repeats", "--steps", type=int, default=None, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (compilation, autotuning)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None, help="forward modes (default: all; flex only on CUDA)")
    p.add_argument("--sdpa", choices=["default", "flash", "efficient", "cudnn", "math"], default="default",
                   help="force one SDPA kernel for the forward benchmarks")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--no-attention", action="store_true", help="skip the attention microbenchmark")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="results JSON (written atomically)")
    p.set_defaults(func=run)


@dataclass
class Settings:
    preset: str
    device: torch.device
    dtype: torch.dtype
    refs: list[int]
    height: int
    width: int
    cond_size: int
    prompt_len: int
    phrase_len: int
    repeats: int
    warmup: int
    modes: list[str]
    sdpa: str
    attention: bool
    seed: int
    config: dict[str, Any] = field(default_factory=dict)


def settings_from_args(args: argparse.Namespace) -> Settings:
    name = args.preset or ("flux-dev-random" if torch.cuda.is_available() else "tiny")
    pre = PRESETS[name]
    device = torch.device(args.device or (pre.device if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MusarError("--device cuda, but this machine has no CUDA GPU")
    if name == "flux-dev-random" and device.type != "cuda":
        raise MusarError("the flux-dev-random preset (12B parameters) needs --device cuda; use --preset tiny on CPU")
    s = Settings(
        name, device, DTYPES[args.dtype or pre.dtype], sorted(set(args.refs if args.refs is not None else pre.refs)),
        args.height or pre.height, args.width or pre.width, args.cond_size or pre.cond_size,
        args.prompt_len or pre.prompt_len, args.phrase_len or pre.phrase_len,
        args.repeats or pre.repeats, pre.warmup if args.warmup is None else args.warmup,
        list(args.modes or [m for m in MODES if m != "flex" or device.type == "cuda"]),
        args.sdpa, not args.no_attention, args.seed, dict(pre.config),
    )
    if min(s.refs) < 0 or s.repeats < 1 or s.warmup < 0:
        raise MusarError("--refs must be >= 0, --repeats >= 1 and --warmup >= 0")
    for what, px in (("--height", s.height), ("--width", s.width), ("--cond-size", s.cond_size)):
        if px < 16 or px % 16:
            raise MusarError(f"{what} must be a positive multiple of 16 (one token = 16x16 pixels), got {px}")
    return s


def run(args: argparse.Namespace) -> int:
    out = check_writable(args.out)
    s = settings_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise MusarError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from musar.bench_forward import forward_bench

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

    from musar.bench_attention import SDPA_KERNELS

    return sdpa_kernel(SDPA_KERNELS[name])


def _meta(s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    from musar.routing import resolve_backend

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
    from musar.bench_attention import attention_bench
    from musar.layout import TokenLayout

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


def _row(result: dict[str, Any], c: int, mode: str) -> dict[str, Any] | None:
    return next((r for r in result["forward"] if r["c"] == c and r["mode"] == mode), None)


def evaluate_targets(result: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The issue's H100 targets, computed from this run; ``met`` only on CUDA."""
    auto = result["meta"]["auto_backend"]
    att = {a["c"]: a for a in result["attention"]}

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "ms") -> float | None:
        return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None

    def routed(c: int) -> float | None:
        a = att.get(c, {})
        return a.get("ratio_vs_fastest_unmasked", {}).get(f"routed_{auto}")

    dyn = ratio(_row(result, 2, auto), _row(result, 2, "static_only"))
    values: dict[str, tuple[float | None, float]] = {
        "attention_routed_vs_fastest_unmasked_c2": (routed(2), 1.0),
        "attention_routed_vs_fastest_unmasked_c4": (routed(4), 0.85),
        "forward_fast_vs_naive_c2": (ratio(_row(result, 2, "fast"), _row(result, 2, "naive")), 0.9),
        f"forward_{auto}_vs_naive_c2": (ratio(_row(result, 2, auto), _row(result, 2, "naive")), 0.9),
        "dynamic_routing_overhead_c2": (None if dyn is None else dyn - 1.0, 0.03),
        "cached_vs_plain_c2": (ratio(_row(result, 2, "cached"), _row(result, 0, "plain")), 1.10),
        "peak_memory_vs_naive_c2": (ratio(_row(result, 2, auto), _row(result, 2, "naive"), "peak_mib"), 1.02),
    }
    cuda = device.type == "cuda"
    out: dict[str, Any] = {
        name: {"value": v, "limit": limit, "met": (v <= limit) if cuda and v is not None else None}
        for name, (v, limit) in values.items()
    }
    if not cuda:
        out["note"] = "CPU run: the targets are for an H100 in bf16 and are not judged here"
    return out


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
        lines += ["", f"attention c={a['c']} L={a['L']}  kept {_fmt(a.get('kept_fraction'), '.1%')} of scores, "
                      f"{_fmt(a.get('block_kept_fraction'), '.1%')} of flex blocks; fastest unmasked: {a.get('fastest_unmasked', '-')}"]
        ratios = a.get("ratio_vs_fastest_unmasked", {})
        for name, ms in a["ms"].items():
            lines.append(f"   {name:<22} {ms:>9.3f} ms  {_fmt(ratios.get(name), '6.2f'):>6}x")
        for name, err in a["errors"].items():
            lines.append(f"   {name:<22} unavailable: {err[:90]}")
    lines.append("")
    for name, t in result["targets"].items():
        if name != "note":
            met = {True: "met", False: "MISSED", None: "not judged"}[t["met"]]
            lines.append(f"target {name:<42} {_fmt(t['value'], '.3f'):>7} (limit {t['limit']})  {met}")
    if "note" in result["targets"]:
        lines.append(result["targets"]["note"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m musar.bench ...``: the same command without the ``musar`` entry point."""
    parser = argparse.ArgumentParser(prog="musar")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except MusarError as e:
        print(f"musar bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
