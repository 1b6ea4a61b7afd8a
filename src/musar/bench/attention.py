"""Timing helpers and the attention-only microbenchmark of ``musar bench``.

One attention call at the shapes of a MUSAR forward with c references: the routed call of
each backend (dynamic routing included: affinity, argmax, grouping) against *unmasked* SDPA
on the same q/k/v with every SDPA kernel this machine has, so "routing costs nothing" is
judged against the fastest kernel, not the slowest (docs/design.md sec. 9).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from musar.models.attention import RoutingContext
from musar.models.flex import block_stats, flex_plan, flex_statics
from musar.models.layout import TokenLayout
from musar.models.options import RoutingOptions, resolve_backend
from musar.models.routing import SegmentMap

SDPA_KERNELS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    ms_all: list[float]
    peak_mib: float | None  # peak allocated during the timed calls (CUDA only)
    extra_mib: float | None  # of which above what was allocated before them

    def spread(self) -> dict[str, Any]:
        return spread(self.ms_all)


def spread(times: list[float], unit: str = "ms") -> dict[str, Any]:
    """Median plus what it hides: one slow call (a late compile, a busy neighbour) moves min-max
    and not the median, so a reader can tell a steady number from a lucky one."""
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return {unit: statistics.median(times), f"{unit}_min": min(times), f"{unit}_max": max(times),
            f"{unit}_iqr": q3 - q1, "n": len(times), f"{unit}_all": list(times)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> Timing:
    """Median wall time of ``fn`` after ``warmup`` untimed calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = extra = None
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated(device)
        peak, extra = peak_bytes / 2**20, (peak_bytes - before) / 2**20
    return Timing(statistics.median(times), times, peak, extra)


def default_spans(num_conditions: int, batch: int, prompt_len: int) -> torch.Tensor:
    """Subject phrase k at prompt tokens [1 + 3k, 3 + 3k): disjoint two-token spans."""
    if 3 * num_conditions + 1 > prompt_len:
        raise ValueError(f"a prompt of {prompt_len} tokens is too short for {num_conditions} subject spans")
    return torch.tensor([[[1 + 3 * k, 2] for k in range(num_conditions)]] * batch, dtype=torch.long)


def attention_bench(
    layout: TokenLayout,
    *,
    heads: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    backends: list[str],
    warmup: int,
    repeats: int,
    seed: int = 0,
) -> dict[str, Any]:
    """One routed attention call at ``layout``'s shapes vs unmasked SDPA on the same tensors."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(1, heads, layout.total, head_dim, generator=g).to(device, dtype) for _ in range(3))
    spans = default_spans(max(1, layout.num_conditions), 1, layout.prompt).to(device)
    ms: dict[str, float] = {}
    spreads: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}

    def measure(name: str, fn: Callable[[], Any]) -> None:
        try:
            t = time_call(fn, device, warmup=warmup, repeats=repeats)
            ms[name], spreads[name] = t.ms, t.spread()
        except Exception as e:  # a kernel this machine lacks is a result, not a failure
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]

    with torch.no_grad():
        measure("sdpa_default", lambda: F.scaled_dot_product_attention(q, k, v))
        for name, kernel in SDPA_KERNELS.items():
            if device.type == "cpu" and name in ("efficient", "cudnn"):
                continue  # CUDA-only kernels

            def unmasked(kernel: SDPBackend = kernel) -> torch.Tensor:
                with sdpa_kernel(kernel):
                    return F.scaled_dot_product_attention(q, k, v)

            measure(f"sdpa_{name}", unmasked)
        if device.type == "cuda":
            from musar.models.flex import _flex_kernel

            measure("flex_unmasked", lambda: _flex_kernel(device)(q, k, v))

        result: dict[str, Any] = {"c": layout.num_conditions, "L": layout.total, "heads": heads, "head_dim": head_dim}
        if layout.num_conditions:
            for backend in backends:
                opts = RoutingOptions(backend=backend)  # type: ignore[arg-type]
                ctx = RoutingContext(layout, opts, spans)
                measure(f"routed_{backend}", lambda ctx=ctx: ctx.layer(0).attend(q, k, v))
            ctx = RoutingContext(layout, RoutingOptions(), spans)
            q_map = SegmentMap.of(layout)
            if layout.num_conditions >= 2:  # dynamic routing acts only from two subjects on
                measure("affinity", lambda: ctx.layer(0).compute_routes(q, k, q_map, q_map))
            routes = ctx.layer(0).compute_routes(q, k, q_map, q_map)
            statics = flex_statics(q_map, q_map, device=device)
            stats = block_stats(statics, flex_plan(statics, routes, 1, backward=False))
            result["kept_fraction"] = stats["kept_fraction"]  # a property of the routes, whatever the backend
            if "flex" in backends:  # the block mask and its tiles cost or mean something only to flex
                measure("flex_block_mask", lambda: flex_plan(statics, routes, 1, backward=False))
                result.update(stats)
            _measure_cached(layout, q, k, v, routes, backends, measure)
            if routes is not None:
                counts = torch.bincount(routes.flatten(), minlength=layout.num_conditions)
                result["route_share"] = (counts.float() / counts.sum()).tolist()
    unmasked_ms = {n: t for n, t in ms.items() if n.startswith("sdpa_") and n != "sdpa_math"}
    if unmasked_ms:
        fastest = min(unmasked_ms, key=unmasked_ms.__getitem__)
        result["fastest_unmasked"] = fastest
        result["ratio_vs_fastest_unmasked"] = {
            n: t / unmasked_ms[fastest] for n, t in ms.items() if n.startswith(("routed_", "affinity", "flex_"))
        }
    result["ms"] = ms
    result["spread"] = spreads
    result["errors"] = errors
    result["auto_backend"] = resolve_backend("auto", device)
    return result


def _measure_cached(
    layout: TokenLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routes: torch.Tensor | None,
    backends: list[str],
    measure: Callable[[str, Callable[[], Any]], None],
) -> None:
    """The attention of a cached forward: [PROMPT, NOISE] queries, main + cached condition keys."""
    from musar.models.attention import fast_routed_attention
    from musar.models.flex import flex_routed_attention

    q_map, k_map = SegmentMap.main_rows(layout), SegmentMap.cached_keys(layout)
    q_main = q[:, :, q_map.layout_positions(layout).to(q.device)]
    k_pos = k_map.layout_positions(layout).to(q.device)
    k_all, v_all = k[:, :, k_pos], v[:, :, k_pos]
    kwargs = {"independent_conditions": True, "q_map": q_map, "k_map": k_map}
    if "fast" in backends:
        measure("routed_cached_fast", lambda: fast_routed_attention(q_main, k_all, v_all, layout, routes, **kwargs))
    if "flex" in backends:
        statics = flex_statics(q_map, k_map, independent_conditions=True, device=q.device)
        measure(
            "routed_cached_flex",
            lambda: flex_routed_attention(q_main, k_all, v_all, layout, routes, statics=statics, **kwargs),
        )
