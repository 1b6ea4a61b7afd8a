"""``torch.compile`` over the routed transformer: one graph, no break in routed attention, same result.

Graph-break checks trace with dynamo only (``explain``, ``backend="aot_eager"``); one small
inductor run compiles the sync-free ``fast`` attention for real. Compiled and eager outputs are
compared at atol 1e-5 (float32): the compiled ``fast`` path masks NOISE rows instead of
splitting them, which changes only the summation order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch._dynamo.utils import counters

from musar.cli import main
from musar.lora import BranchLoRAConfig, inject_branch_lora
from musar.models.boxes import box_candidates
from musar.models.fast import fast_routed_attention
from musar.models.layout import TokenLayout
from musar.models.options import RoutingOptions
from musar.models.routing import SegmentMap, routed_mask
from musar.models.transformer import MusarTransformer
from musar.pipelines.routing_maps import RoutingRecorder

from helpers import make_inputs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SPANS = [[(0, 1), (1, 1), (2, 1)], [(7, 1), (6, 1), (5, 1)]]
BOXES = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0)]


@pytest.fixture
def model(tiny_flux_config: dict) -> MusarTransformer:
    torch.manual_seed(0)
    model = MusarTransformer(**tiny_flux_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def _inputs(model: MusarTransformer, c: int, boxes: bool = False) -> dict:
    inputs = make_inputs(model, batch=2, num_conditions=c, spans=[s[:c] for s in SPANS])
    if boxes:
        inputs["conditions"].candidates = box_candidates(BOXES[:c], (4, 4), "none")[None].expand(2, -1, -1)
    return inputs


# ---- the sync-free fast path, eagerly -------------------------------------------------------


@pytest.mark.parametrize("routes_kind", ["mean", "per_head", "no_condition"])
@pytest.mark.parametrize("cached", [False, True])
def test_sync_free_fast_attention_equals_the_reference(routes_kind: str, cached: bool) -> None:
    lay = TokenLayout(prompt=6, noise=20, cond_image=(4, 6, 5), cond_text=(2, 3, 2))
    g = torch.Generator().manual_seed(1)
    b, h, c = 2, 3, lay.num_conditions
    shape = (b, h, lay.noise) if routes_kind == "per_head" else (b, lay.noise)
    routes = torch.randint(0, c + (routes_kind == "no_condition"), shape, generator=g)
    q_map, k_map = (SegmentMap.main_rows(lay), SegmentMap.cached_keys(lay)) if cached else (SegmentMap.of(lay),) * 2
    q = torch.randn(b, h, q_map.length, 16, generator=g)
    k, v = (torch.randn(b, h, k_map.length, 16, generator=g) for _ in range(2))
    mask = routed_mask(lay, routes)[:, :, q_map.layout_positions(lay)][..., k_map.layout_positions(lay)]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for sync_free in (False, True):
        got = fast_routed_attention(q, k, v, lay, routes, q_map=q_map, k_map=k_map, sync_free=sync_free)
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), (sync_free, (got - expected).abs().max())


# ---- the whole forward is one graph ---------------------------------------------------------


CASES = {
    "fast-lora-per_head-boxes-capture": dict(c=3, opts={"backend": "fast", "per_head": True}, lora=True, boxes=True, capture=True),
    "reference": dict(c=2, opts={"backend": "reference"}),
    "flex": dict(c=2, opts={"backend": "flex"}),
    "cached": dict(c=2, opts={"independent_conditions": True}, cached=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_whole_forward_traces_without_a_graph_break(model: MusarTransformer, name: str) -> None:
    case = CASES[name]
    if case.get("lora"):
        inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    inputs = _inputs(model, case["c"], case.get("boxes", False))
    opts = RoutingOptions(**case["opts"])
    if case.get("cached"):
        cond = inputs.pop("conditions")
        with torch.no_grad():
            inputs["condition_cache"] = model.build_condition_cache(cond, inputs["pooled_projections"], inputs["guidance"], opts)
    if case.get("capture"):
        inputs["capture"] = RoutingRecorder()
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs, routing=opts, step_index=3)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


# ---- regional compilation: fullgraph blocks, shared by every layer and step -----------------


def test_compile_repeated_blocks_is_fullgraph_and_matches_eager(model: MusarTransformer) -> None:
    inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    inputs = _inputs(model, 3, boxes=True)
    opts = RoutingOptions(backend="fast", start_step=1)  # step 0 unrouted, later steps routed

    def run() -> tuple[list[torch.Tensor], RoutingRecorder, torch.Tensor]:
        recorder = RoutingRecorder()
        with torch.no_grad():
            outs = [model(**inputs, routing=opts, step_index=s, capture=recorder).sample for s in range(3)]
            outs.append(model(**inputs, routing=RoutingOptions(backend="flex")).sample)  # auto's choice on CUDA
            cond = inputs["conditions"]
            indep = RoutingOptions(independent_conditions=True)
            cache = model.build_condition_cache(cond, inputs["pooled_projections"], inputs["guidance"], indep)
            plain = {k: v for k, v in inputs.items() if k != "conditions"}
            cached = model(**plain, condition_cache=cache, routing=indep).sample
        return outs, recorder, cached

    eager, eager_rec, eager_cached = run()
    torch._dynamo.reset()
    counters.clear()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")  # fullgraph: a break would raise
    compiled, compiled_rec, compiled_cached = run()
    for got, want in zip(compiled, eager):
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert torch.allclose(compiled_cached, eager_cached, atol=1e-5, rtol=0)
    assert compiled_rec.steps == eager_rec.steps == [1, 2]  # step 0 unrouted
    for step in compiled_rec.steps:
        assert torch.equal(compiled_rec.routes(step), eager_rec.routes(step))
        assert torch.allclose(compiled_rec.affinity(step), eager_rec.affinity(step), atol=1e-6)
    # Per (double|single) x (unrouted|routed|flex|cached): 8 graphs. One per layer would be 16+.
    assert counters["stats"]["unique_graphs"] <= 8, dict(counters["stats"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiles_the_sync_free_fast_attention() -> None:
    lay = TokenLayout(prompt=8, noise=16, cond_image=(4, 4), cond_text=(3, 3))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, lay.total, 16, generator=g) for _ in range(3))
    routes = torch.randint(0, 3, (2, lay.noise), generator=g)  # route 2: no condition
    compiled = torch.compile(fast_routed_attention, fullgraph=True)
    got = compiled(q, k, v, lay, routes)  # sync_free by default inside the compiled graph
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=routed_mask(lay, routes))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_gpu_compile_repeated_blocks_with_auto_routing_matches_reference(tiny_flux_config: dict) -> None:
    """On CUDA ``auto`` is flex: regional inductor compile, fullgraph, against the dense reference."""
    torch.manual_seed(0)
    model = MusarTransformer(**tiny_flux_config).cuda().eval()
    inputs = make_inputs(model, batch=2, num_conditions=3, spans=SPANS)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    cond = inputs["conditions"]
    for name in ("image_latents", "text_embeds", "image_ids"):
        setattr(cond, name, [t.cuda() for t in getattr(cond, name)])
    cond.spans = cond.spans.cuda()
    with torch.no_grad():
        expected = model(**inputs, routing=RoutingOptions(backend="reference")).sample
        model.compile_repeated_blocks(fullgraph=True)
        got = [model(**inputs, step_index=s).sample for s in range(2)]
    for out in got:  # float32 on CUDA; 1e-3 leaves room for TF32, a routing error is O(0.1)
        assert torch.allclose(out, expected, atol=1e-3, rtol=1e-3)


# ---- musar generate --compile ---------------------------------------------------------------


def test_generate_compile_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile`` compiles the blocks (dynamo only here, inductor would take a minute on CPU)."""
    compile_kwargs: list[dict] = []
    original = MusarTransformer.compile_repeated_blocks

    def traced_only(self: MusarTransformer, **kwargs: object) -> None:
        compile_kwargs.append(kwargs)
        original(self, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(MusarTransformer, "compile_repeated_blocks", traced_only)
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 200, 30))):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{name}.png")
    args = [
        "generate", "--prompt", "a corgi and a red backpack on the beach",
        "--subject", str(tmp_path / "a.png"), "a corgi", "--subject", str(tmp_path / "b.png"), "a red backpack",
        "--preset", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--condition-size", "32",
    ]
    assert main([*args, "--out", str(tmp_path / "eager.png")]) == 0
    torch._dynamo.reset()
    counters.clear()
    assert main([*args, "--compile", "--out", str(tmp_path / "compiled.png")]) == 0
    assert compile_kwargs == [{"fullgraph": True}]
    assert counters["stats"]["unique_graphs"] >= 2, "the denoising steps ran the compiled blocks"
    eager = torch.tensor(list(Image.open(tmp_path / "eager.png").get_flattened_data()), dtype=torch.int16)
    compiled = torch.tensor(list(Image.open(tmp_path / "compiled.png").get_flattened_data()), dtype=torch.int16)
    assert (eager - compiled).abs().max() <= 1  # float32 summation order, then 8-bit rounding
    side = json.loads((tmp_path / "compiled.json").read_text())
    assert side["compile"] is True and json.loads((tmp_path / "eager.json").read_text())["compile"] is False
