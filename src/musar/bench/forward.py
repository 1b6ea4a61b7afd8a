"""Whole-transformer timings of ``musar bench``: plain FLUX, naive concatenation and MUSAR modes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

from musar.bench.attention import default_spans, time_call
from musar.models.attention import RouteRecord
from musar.models.options import RoutingOptions
from musar.models.transformer import ConditionInputs, MusarTransformer, condition_image_ids, latent_image_ids

if TYPE_CHECKING:
    from musar.bench.settings import Settings


def build_random_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> MusarTransformer:
    """The architecture with random weights, allocated directly on ``device`` in ``dtype``.

    Built on the meta device (no host memory, no init kernels), cast while still meta (free),
    then materialised once on the device and filled there: FLUX.1-dev in bf16 needs 24 GB and
    a few seconds instead of a 48 GB float32 detour through diffusers' initialisers.
    """
    with torch.device("meta"):
        model = MusarTransformer(**config)
    # nn.Module.to: diffusers' own .to() warns about float32 modules FLUX does not have
    model = nn.Module.to(model, dtype).to_empty(device=device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                # fan-in scaling keeps activations O(1) through 57 blocks (no inf/NaN in bf16)
                mod.weight.normal_(0.0, mod.in_features**-0.5, generator=gen)
                if mod.bias is not None:
                    mod.bias.zero_()
        for name, p in model.named_parameters():
            if p.dim() == 1 and not name.endswith(".bias"):
                p.fill_(1.0)  # RMSNorm scales
    model.requires_grad_(False)
    return model


def bench_inputs(model: MusarTransformer, s: Settings, c: int) -> tuple[dict[str, Any], ConditionInputs | None]:
    cfg = model.config
    dev, dt = s.device, s.dtype
    g = torch.Generator(device="cpu").manual_seed(s.seed + c)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev, dt)

    grid, cgrid = (s.height // 16, s.width // 16), (s.cond_size // 16,) * 2
    base = {
        "hidden_states": rand(1, math.prod(grid), cfg.in_channels),
        "encoder_hidden_states": rand(1, s.prompt_len, cfg.joint_attention_dim),
        "pooled_projections": rand(1, cfg.pooled_projection_dim),
        "timestep": torch.full((1,), 0.7, device=dev, dtype=dt),
        "img_ids": latent_image_ids(*grid, dev, dt),
        "txt_ids": torch.zeros(s.prompt_len, 3, device=dev, dtype=dt),
        "guidance": torch.full((1,), 3.5, device=dev, dtype=dt) if cfg.guidance_embeds else None,
    }
    if c == 0:
        return base, None
    cond = ConditionInputs(
        image_latents=[rand(1, math.prod(cgrid), cfg.in_channels) for _ in range(c)],
        text_embeds=[rand(1, s.phrase_len, cfg.joint_attention_dim) for _ in range(c)],
        image_ids=[condition_image_ids(k, *cgrid, dev, dt) for k in range(c)],
        spans=default_spans(c, 1, s.prompt_len).to(dev),
    )
    return base, cond


def _use_diffusers_attention(model: MusarTransformer) -> None:
    for block in (*model.transformer_blocks, *model.single_transformer_blocks):
        if not isinstance(block.attn.processor, FluxAttnProcessor):
            block.attn.set_processor(FluxAttnProcessor())


def _diffusers_forward(model: MusarTransformer, base: dict[str, Any], cond: ConditionInputs | None) -> torch.Tensor:
    """FLUX's own forward; with conditions, their tokens simply appended (no mask, one temb)."""
    _use_diffusers_attention(model)
    kw = dict(base)
    if cond is not None:
        kw["hidden_states"] = torch.cat([kw["hidden_states"], *cond.image_latents], dim=1)
        kw["encoder_hidden_states"] = torch.cat([kw["encoder_hidden_states"], *cond.text_embeds], dim=1)
        kw["img_ids"] = torch.cat([kw["img_ids"], *cond.image_ids], dim=0)
        kw["txt_ids"] = torch.cat([kw["txt_ids"], kw["txt_ids"].new_zeros(sum(t.shape[1] for t in cond.text_embeds), 3)])
    try:
        return FluxTransformer2DModel.forward(model, **kw, return_dict=False)[0]
    finally:
        model.use_musar_attention()  # MUSAR's forwards refuse processors that cannot route


def _mode_calls(
    model: MusarTransformer, base: dict[str, Any], cond: ConditionInputs | None, modes: list[str]
) -> dict[str, Callable[[], Any]]:
    if cond is None:
        return {"plain": lambda: _diffusers_forward(model, base, None)} if "plain" in modes else {}
    musar = {
        "reference": RoutingOptions(backend="reference"),
        "fast": RoutingOptions(backend="fast"),
        "flex": RoutingOptions(backend="flex"),
        "static_only": RoutingOptions(dynamic=False),
        "independent": RoutingOptions(independent_conditions=True),
    }
    calls: dict[str, Callable[[], Any]] = {}
    for mode in modes:
        if mode == "naive":
            calls[mode] = lambda: _diffusers_forward(model, base, cond)
        elif mode in musar:
            calls[mode] = lambda opts=musar[mode]: model(**base, conditions=cond, routing=opts, return_dict=False)
    return calls


def forward_bench(
    s: Settings, on_row: Callable[[list[dict[str, Any]]], None] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every requested mode for every c; returns the rows and the routes' share per condition.
    ``on_row(rows)`` is called after each measured row (the GPU suite saves partial results)."""
    model = build_random_model(s.config, s.device, s.dtype, s.seed)
    rows: list[dict[str, Any]] = []
    routes: dict[str, Any] = {}

    def add(new: list[dict[str, Any]]) -> None:
        rows.extend(new)
        if on_row is not None:
            on_row(rows)

    with torch.no_grad():
        for c in s.refs:
            base, cond = bench_inputs(model, s, c)
            for mode, fn in _mode_calls(model, base, cond, s.modes).items():
                add([_timed_row(c, mode, fn, s)])
            if cond is not None and "cached" in s.modes:
                add(_cached_rows(model, base, cond, c, s))
            if cond is not None and c >= 2:
                routes[str(c)] = _route_share(model, base, cond)
    plain = next((r["ms"] for r in rows if r["mode"] == "plain"), None)
    for r in rows:
        naive = next((x["ms"] for x in rows if x["c"] == r["c"] and x["mode"] == "naive"), None)
        r["ratio_vs_plain"] = r["ms"] / plain if plain else None
        r["ratio_vs_naive"] = r["ms"] / naive if naive else None
    return rows, routes


def planned_rows(s: Settings) -> list[tuple[int, str]]:
    """``(c, mode)`` of every row :func:`forward_bench` measures: ``plain`` is the c = 0 row and
    c = 0 has no other (nothing to concatenate or route), so no row stands for a mode that did not run."""
    order = [m for m in s.modes if m != "cached"] + [m for m in s.modes if m == "cached"]  # cached reuses a build
    return [(c, m) for c in s.refs for m in order if (m == "plain") == (c == 0)]


def _timed_row(c: int, mode: str, fn: Callable[[], Any], s: Settings, **extra: Any) -> dict[str, Any]:
    t = time_call(fn, s.device, warmup=s.warmup, repeats=s.repeats)
    return {"c": c, "mode": mode, **t.spread(), "peak_mib": t.peak_mib, "extra_mib": t.extra_mib, **extra}


def _cached_rows(
    model: MusarTransformer, base: dict[str, Any], cond: ConditionInputs, c: int, s: Settings
) -> list[dict[str, Any]]:
    opts = RoutingOptions(independent_conditions=True)

    def build() -> Any:
        return model.build_condition_cache(cond, base["pooled_projections"], base["guidance"], routing=opts)

    build_t = time_call(build, s.device, warmup=min(1, s.warmup), repeats=1)
    cache = build()
    return [
        _timed_row(
            c, "cached", lambda: model(**base, condition_cache=cache, routing=opts, return_dict=False), s,
            cache_build_ms=build_t.ms, cache_mib=cache.nbytes / 2**20,
        )
    ]


def _route_share(model: MusarTransformer, base: dict[str, Any], cond: ConditionInputs) -> list[float]:
    """Share of NOISE tokens routed to each condition, over all layers (random weights route oddly)."""
    records: list[RouteRecord] = []
    model(**base, conditions=cond, capture=records.append, return_dict=False)
    routes = torch.cat([r.routes.flatten() for r in records])
    counts = torch.bincount(routes, minlength=cond.num).float()
    return (counts / counts.sum()).tolist()
