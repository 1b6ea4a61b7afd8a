"""Speed work kept honest: the condition cache, the flex block mask and the bench's tiny mode.

Everything fast must equal the slow, obvious thing: the cached forward equals the uncached one,
the flex block lists keep exactly the blocks the dense reference mask needs, flex equals the
reference backend. GPU-marked tests repeat the flex checks at FLUX's attention shapes in bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from musar.cli.bench import add_parser
from musar.lora import BranchLoRAConfig, inject_branch_lora
from musar.models.boxes import box_candidates
from musar.models.flex import FlexPlan, FlexStatics, flex_plan, flex_routed_attention, flex_statics
from musar.models.layout import TokenLayout
from musar.models.options import RoutingOptions, resolve_backend
from musar.models.routing import SegmentMap, routed_mask, subject_affinity, subject_affinity_fused
from musar.models.transformer import MusarTransformer

from helpers import make_inputs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def model(tiny_flux_config: dict) -> MusarTransformer:
    torch.manual_seed(0)
    return MusarTransformer(**tiny_flux_config).eval()


def _spans(c: int) -> list[list[tuple[int, int]]]:
    return [[(k, 1) for k in range(c)], [(7 - k, 1) for k in range(c)]]


# Layout boxes on make_inputs' 4 x 4 noise grid: quadrants plus a centre box overlapping them;
# the bottom-right corner is outside every box.
BOXES = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.25, 0.25, 0.75, 0.75)]


def _with_boxes(inputs: dict, case: dict) -> dict:
    """Give the case's conditions the route candidates of its boxes (case["boxes"] = outside policy)."""
    if "boxes" in case:
        cond = inputs["conditions"]
        batch = inputs["hidden_states"].shape[0]
        cond.candidates = box_candidates(BOXES[: cond.num], (4, 4), case["boxes"])[None].expand(batch, -1, -1)
    return inputs


# ---- condition K/V cache -------------------------------------------------------------------


CACHE_CASES = [
    dict(c=1, opts={}),
    dict(c=2, opts={}),
    dict(c=2, opts={"dynamic": False}),
    dict(c=3, opts={"per_head": True}),
    dict(c=3, opts={"backend": "reference"}),
    dict(c=2, opts={"backend": "flex"}),
    dict(c=1, opts={}, lora=True),
    dict(c=2, opts={}, lora=True),
    dict(c=3, opts={"per_head": True}, lora=True),
    dict(c=1, opts={}, boxes="all"),
    dict(c=2, opts={}, boxes="none"),
    dict(c=3, opts={"per_head": True}, boxes="all"),
    dict(c=4, opts={"backend": "reference"}, boxes="none"),
    dict(c=2, opts={"backend": "flex"}, boxes="none"),
    dict(c=3, opts={}, lora=True, boxes="none"),
]


def _case_id(case: dict) -> str:
    opts = "-".join(f"{k}={v}" for k, v in case["opts"].items()) or "default"
    boxes = f"-boxes={case['boxes']}" if "boxes" in case else ""
    return f"c{case['c']}-{opts}{'-lora' if case.get('lora') else ''}{boxes}"


@pytest.mark.parametrize("case", CACHE_CASES, ids=_case_id)
def test_cached_forward_equals_uncached(model: MusarTransformer, case: dict) -> None:
    if case.get("lora"):
        inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.05)
    opts = RoutingOptions(independent_conditions=True, **case["opts"])
    inputs = _with_boxes(make_inputs(model, batch=2, num_conditions=case["c"], spans=_spans(case["c"])), case)
    cond = inputs.pop("conditions")
    with torch.no_grad():
        cache = model.build_condition_cache(cond, inputs["pooled_projections"], inputs["guidance"], routing=opts)
        # One cache serves every denoising step: other latents, other t, other step index.
        for step, t in enumerate((0.9, 0.4)):
            x = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(step))
            step_inputs = dict(inputs, hidden_states=x, timestep=torch.full((2,), t))
            full = model(**step_inputs, conditions=cond, routing=opts, step_index=step).sample
            cached = model(**step_inputs, condition_cache=cache, routing=opts, step_index=step).sample
            assert torch.allclose(cached, full, atol=1e-5, rtol=0), (cached - full).abs().max()
    assert cache.nbytes > 0 and len(cache.keys) == len(model.transformer_blocks) + len(model.single_transformer_blocks)


def test_cache_refuses_what_it_cannot_serve(model: MusarTransformer) -> None:
    inputs = make_inputs(model, num_conditions=2)
    cond = inputs.pop("conditions")
    with pytest.raises(ValueError, match="independent_conditions"):
        model.build_condition_cache(cond, inputs["pooled_projections"], inputs["guidance"], routing=RoutingOptions())
    cache = model.build_condition_cache(cond, inputs["pooled_projections"], inputs["guidance"])
    with pytest.raises(ValueError, match="independent_conditions"):
        model(**inputs, condition_cache=cache, routing=RoutingOptions())
    with pytest.raises(ValueError, match="pooled_projections"):
        model(**dict(inputs, pooled_projections=inputs["pooled_projections"] + 1), condition_cache=cache)
    with pytest.raises(ValueError, match="guidance"):
        model(**dict(inputs, guidance=inputs["guidance"] * 2), condition_cache=cache)
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, conditions=cond, condition_cache=cache)


# ---- flex block mask: pure tensors ---------------------------------------------------------


def _emulate(plan: FlexPlan, statics: FlexStatics) -> torch.Tensor:
    """What a block-sparse kernel computes as the mask: kept blocks only, mask_mod on partial ones."""
    bs, lq, lk = statics.block_size, statics.q_len, statics.k_len

    def dense(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :lq, :lk]

    by_class = statics.table[plan.q_class[..., :lq, None], statics.k_class[None, None, None, :lk]]
    return dense(plan.full) | (dense(plan.partial) & by_class)


LAYOUTS = [
    TokenLayout(prompt=20, noise=64, cond_image=(24, 16), cond_text=(5, 7)),
    TokenLayout(prompt=16, noise=32, cond_image=(16, 16, 16), cond_text=(4, 4, 4)),
    TokenLayout(prompt=8, noise=40, cond_image=(12,), cond_text=(3,)),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"c{lay.num_conditions}")
@pytest.mark.parametrize("routing", ["none", "mean", "per_head", "mean_with_no_condition"])
@pytest.mark.parametrize(
    ("rules", "cached"),
    [({}, False), ({"independent_conditions": True}, False), ({"static": False}, False), ({"independent_conditions": True}, True)],
    ids=["paper", "indep", "nostatic", "indep-cached"],
)
def test_flex_block_lists_match_dense_reference(layout: TokenLayout, routing: str, rules: dict, cached: bool) -> None:
    g = torch.Generator().manual_seed(layout.total)
    b, h, c = 2, 3, layout.num_conditions
    routes = None
    if routing == "mean_with_no_condition":  # given routes: route c reads no condition, any c >= 1
        routes = torch.randint(0, c + 1, (b, layout.noise), generator=g)
    elif routing != "none" and c >= 2:
        routes = torch.randint(0, c, (b, layout.noise) if routing == "mean" else (b, h, layout.noise), generator=g)
    q_map, k_map = (SegmentMap.main_rows(layout), SegmentMap.cached_keys(layout)) if cached else (SegmentMap.of(layout),) * 2
    ref = routed_mask(layout, routes, **rules).expand(b, -1, -1, -1)
    ref = ref[:, :, q_map.layout_positions(layout)][..., k_map.layout_positions(layout)]
    for block in (4, 8, 16):
        statics = flex_statics(q_map, k_map, block_size=block, **rules)
        plan = flex_plan(statics, routes, b)
        hr = plan.q_order.shape[1]
        sorted_ref = ref[:, :hr].gather(2, plan.q_order[..., None].expand(-1, -1, -1, k_map.length))
        assert torch.equal(_emulate(plan, statics), sorted_ref)
        # Tight: a full block is all allowed, a partial block mixed, a dropped block all refused.
        pad_q = plan.q_class.shape[-1] - statics.q_len
        pad_k = math.ceil(statics.k_len / block) * block - statics.k_len
        tiles = F.pad(sorted_ref, (0, pad_k, 0, pad_q)).unflatten(-1, (-1, block)).unflatten(-3, (-1, block))
        any_ok, all_ok = tiles.any(-1).any(-2), tiles.all(-1).all(-2)  # padding counts as refused
        assert torch.equal(plan.full, all_ok)
        assert torch.equal(plan.partial | plan.full, any_ok)
        # The BlockMask decodes to exactly these lists.
        assert torch.equal(plan.block_mask.to_dense().bool(), plan.partial | plan.full)
        assert torch.equal(plan.block_mask.full_kv_num_blocks, plan.full.sum(-1).int())


def test_grouping_makes_whole_key_blocks_drop_out() -> None:
    # FLUX-like proportions at 1/16 scale: routed, grouped NOISE queries skip the other condition.
    lay = TokenLayout.uniform(prompt=32, noise=256, num_conditions=2, cond_image=64, cond_text=2)
    routes = torch.arange(lay.noise)[None] % 2  # interleaved: the worst case before sorting
    q_map = SegmentMap.of(lay)
    plan = flex_plan(flex_statics(q_map, q_map, block_size=16), routes, 1)
    kept = (plan.partial | plan.full).float().mean().item()
    assert kept < 0.9 and plan.full.float().mean() > 0.5 * kept


# ---- flex vs reference through the model (CPU: eager flex, forward only) -------------------


# independent_conditions runs through flex in the cache test (c2-backend=flex); c = 1 and every
# rule set are covered block by block above. Eager CPU flex is slow, so only these here.
FLEX_CASES = [
    dict(c=2, opts={}), dict(c=3, opts={"per_head": True}), dict(c=3, opts={"static": False}),
    dict(c=1, opts={}, boxes="all"), dict(c=4, opts={"per_head": True}, boxes="none"),
]


@pytest.mark.parametrize("case", FLEX_CASES, ids=_case_id)
def test_flex_equals_reference_forward(model: MusarTransformer, case: dict) -> None:
    inputs = _with_boxes(make_inputs(model, batch=2, num_conditions=case["c"], spans=_spans(case["c"])), case)
    with torch.no_grad():
        ref = model(**inputs, routing=RoutingOptions(backend="reference", **case["opts"])).sample
        flex = model(**inputs, routing=RoutingOptions(backend="flex", **case["opts"])).sample
    assert torch.allclose(flex, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_cpu_flex_kernel_honours_the_block_lists() -> None:
    """Eager flex ignores the block lists (it applies mask_mod everywhere); inductor's CPU kernel
    skips dropped blocks and full blocks' mask_mod, so this checks the lists with a real kernel,
    and that a new mask (new routes, new closure) reuses the compiled graph."""
    from torch._dynamo.utils import counters

    lay = TokenLayout(prompt=20, noise=64, cond_image=(24, 16), cond_text=(5, 7))
    q_map = SegmentMap.of(lay)
    statics = flex_statics(q_map, q_map, block_size=16)
    kernel = torch.compile(torch.nn.attention.flex_attention.flex_attention, dynamic=False)
    bi, hi = torch.arange(2)[:, None, None], torch.arange(2)[None, :, None]
    graphs = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(2, 2, lay.total, 16, generator=g) for _ in range(3))
        routes = torch.randint(0, 2, (2, lay.noise), generator=g)
        plan = flex_plan(statics, routes, 2)
        out = kernel(q[bi, hi, plan.q_order], k, v, block_mask=plan.block_mask)[bi, hi, plan.q_order.argsort(-1)]
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=routed_mask(lay, routes))
        assert torch.allclose(out, ref, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0], "a new block mask recompiled the kernel"


# ---- affinity and backend choice ------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
def test_fused_affinity_equals_reference(per_head: bool) -> None:
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 40, 16, generator=g), torch.randn(2, 3, 12, 16, generator=g)
    spans = torch.tensor([[[0, 2], [3, 3], [8, 1]], [[9, 3], [0, 1], [4, 4]]])
    ref = subject_affinity(q, k, spans, per_head=per_head)
    fused = subject_affinity_fused(q, k, spans, per_head=per_head)
    assert fused.shape == ref.shape and torch.allclose(fused, ref, atol=1e-6)


def test_backend_choice() -> None:
    assert resolve_backend("auto", "cpu") == "fast" and resolve_backend("auto", "cuda") == "flex"
    assert resolve_backend("reference", "cuda") == "reference"
    assert RoutingOptions().backend == "auto" and RoutingOptions(backend="flex").backend == "flex"
    with pytest.raises(ValueError, match="backend"):
        RoutingOptions(backend="triton")  # type: ignore[arg-type]


# ---- the bench's tiny mode -----------------------------------------------------------------


def test_bench_tiny_writes_documented_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "bench.json"
    args = parser.parse_args([
        "bench", "--preset", "tiny", "--device", "cpu", "--refs", "0", "2", "--repeats", "1", "--warmup", "0",
        "--threads", "1", "--modes", "plain", "naive", "fast", "static_only", "cached", "--out", str(out),
    ])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "musar.bench/1"
    assert {"meta", "forward", "attention", "routes", "targets"} <= data.keys()
    assert data["meta"]["auto_backend"] == "fast" and data["meta"]["tokens"]["noise"] == 64
    modes = {(r["c"], r["mode"]) for r in data["forward"]}
    assert modes == {(0, "plain"), (2, "naive"), (2, "fast"), (2, "static_only"), (2, "cached")}
    for r in data["forward"]:
        assert r["ms"] > 0 and r["ratio_vs_plain"] > 0 and {"peak_mib", "ms_all", "ratio_vs_naive"} <= r.keys()
    cached = next(r for r in data["forward"] if r["mode"] == "cached")
    assert cached["cache_build_ms"] > 0 and cached["cache_mib"] > 0
    att = {a["c"]: a for a in data["attention"]}
    assert {"sdpa_default", "sdpa_math", "routed_fast", "affinity"} <= att[2]["ms"].keys()
    assert 0 < att[2]["kept_fraction"] < 1 and att[2]["fastest_unmasked"].startswith("sdpa_")
    assert data["targets"]["cached_vs_plain_c2"]["met"] is None  # never judged on CPU
    assert "musar bench" in capsys.readouterr().out


# ---- GPU: FLUX attention shapes in bf16, forward and backward ------------------------------


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("c", [2, 4])
@pytest.mark.parametrize("backend", ["flex", "fast"])
@pytest.mark.parametrize("per_head", [False, True], ids=["mean", "per_head"])
def test_gpu_routed_attention_matches_reference_bf16(c: int, backend: str, per_head: bool) -> None:
    """FLUX.1-dev at 1024x1024 with c 512x512 references: one attention call, fwd and bwd."""
    from musar.models.attention import RoutingContext, fast_routed_attention

    lay = TokenLayout.uniform(prompt=512, noise=4096, num_conditions=c, cond_image=1024, cond_text=32)
    g = torch.Generator(device="cuda").manual_seed(c)
    # bf16-representable inputs, so the float32 reference measures kernel error only
    q, k, v, grad = (torch.randn(1, 24, lay.total, 128, device="cuda", generator=g).bfloat16().float() for _ in range(4))
    spans = torch.tensor([[[1 + 3 * i, 2] for i in range(c)]], device="cuda")
    ctx = RoutingContext(lay, RoutingOptions(per_head=per_head), spans)
    routes = ctx.layer(0).compute_routes(q.bfloat16(), k.bfloat16())
    assert routes is not None and len(routes.unique()) == c
    mask = routed_mask(lay, routes)

    def run(fn: Callable[..., torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad.to(dtype))
        return (out.detach(), *(x.grad for x in leaves))

    def reference(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)

    routed = flex_routed_attention if backend == "flex" else fast_routed_attention
    exact = run(reference, torch.float32)
    ref_bf16 = run(reference, torch.bfloat16)
    got = run(lambda q_, k_, v_: routed(q_, k_, v_, lay, routes), torch.bfloat16)
    for name, e, r, x in zip(("out", "dq", "dk", "dv"), exact, ref_bf16, got):
        assert _max_err(x, e) <= 2 * _max_err(r, e) + 2e-3, name


def _cuda_inputs(inputs: dict) -> dict:
    out = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    cond = out["conditions"]
    for name in ("image_latents", "text_embeds", "image_ids"):
        setattr(cond, name, [t.cuda() for t in getattr(cond, name)])
    cond.spans = cond.spans.cuda()
    if cond.candidates is not None:
        cond.candidates = cond.candidates.cuda()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("case", [dict(c=2, opts={}), dict(c=3, opts={"per_head": True}),
                                  dict(c=2, opts={"independent_conditions": True}),
                                  dict(c=3, opts={}, boxes="none"), dict(c=1, opts={}, boxes="all")], ids=_case_id)
def test_gpu_flex_model_forward_backward_with_lora(tiny_flux_config: dict, case: dict) -> None:
    """The training path on CUDA: flex (compiled) equals reference, outputs and LoRA gradients."""
    torch.manual_seed(0)
    model = MusarTransformer(**tiny_flux_config).cuda()
    inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    inputs = _with_boxes(make_inputs(model, batch=2, num_conditions=case["c"], spans=_spans(case["c"])), case)
    inputs = _cuda_inputs(inputs)
    results = []
    for backend in ("reference", "flex"):
        model.zero_grad()
        out = model(**inputs, routing=RoutingOptions(backend=backend, **case["opts"])).sample
        out.square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.detach(), grads))
    # float32 on CUDA; 1e-3 leaves room for TF32 inside kernels, a routing error is O(0.1)
    assert torch.allclose(results[0][0], results[1][0], atol=1e-3, rtol=1e-3)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_auto_backend_under_torch_compile(tiny_flux_config: dict) -> None:
    torch.manual_seed(0)
    model = MusarTransformer(**tiny_flux_config).cuda().eval()
    inputs = make_inputs(model, batch=1, num_conditions=2)
    inputs = _cuda_inputs(inputs)
    with torch.no_grad():
        expected = model(**inputs, routing=RoutingOptions(backend="reference")).sample
        compiled = torch.compile(model)
        got = compiled(**inputs, routing=RoutingOptions(backend="auto")).sample
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3)
