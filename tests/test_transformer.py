"""MusarTransformer: equivalence with diffusers, routing by behaviour, fast == reference."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from musar.lora import BranchLoRAConfig, inject_branch_lora
from musar.models.attention import LayerRouting, RouteRecord, RoutingContext
from musar.models.boxes import box_candidates
from musar.models.layout import TokenLayout
from musar.models.options import RoutingOptions
from musar.models.transformer import MusarTransformer

from helpers import make_inputs


@pytest.fixture
def model(tiny_flux_config: dict) -> MusarTransformer:
    torch.manual_seed(0)
    model = MusarTransformer(**tiny_flux_config).eval()
    model.use_musar_attention()  # construction already did (idempotent); these tests call attention layers directly
    return model


def test_no_conditions_equals_diffusers(
    model: MusarTransformer, tiny_flux_config: dict, tmp_path: Path
) -> None:
    # The real loading path: a diffusers checkpoint folder loaded as a MusarTransformer.
    base = FluxTransformer2DModel(**tiny_flux_config).eval()
    base.save_pretrained(tmp_path / "transformer")
    musar = MusarTransformer.from_pretrained(tmp_path / "transformer").eval()
    inputs = make_inputs(musar, batch=2)
    with torch.no_grad():
        expected = base(**inputs).sample
        assert torch.allclose(musar(**inputs).sample, expected, atol=1e-6, rtol=0)
        inject_branch_lora(musar, BranchLoRAConfig(noise_rank=2, subject_rank=4))
        assert torch.allclose(musar(**inputs).sample, expected, atol=1e-6, rtol=0)


def _attn_call(
    model: MusarTransformer, layout: TokenLayout, options: RoutingOptions, spans, single: bool, x, t
):
    """One attention layer of the model on hidden states (image stream x, text stream t)."""
    ctx = RoutingContext(layout, options, spans)
    rotary = model.pos_embed(torch.zeros(layout.total, 3))
    if single:
        block = model.single_transformer_blocks[0]
        out = block.attn(hidden_states=torch.cat([t, x], 1), image_rotary_emb=rotary, routing=ctx.layer(2))
        return out[:, : t.shape[1]], out[:, t.shape[1] :]
    block = model.transformer_blocks[0]
    img, txt = block.attn(
        hidden_states=x, encoder_hidden_states=t, image_rotary_emb=rotary, routing=ctx.layer(0)
    )
    return txt, img


LAYOUT = TokenLayout(prompt=6, noise=8, cond_image=(4, 4, 4), cond_text=(2, 2, 2))
SPANS = torch.tensor([[[0, 2], [2, 2], [4, 2]]])


def _streams(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, LAYOUT.image_len, 32, generator=g), torch.randn(1, LAYOUT.text_len, 32, generator=g)


def _perturb(x: torch.Tensor, rows: slice, offset: int = 0) -> torch.Tensor:
    x = x.clone()
    x[:, rows.start - offset : rows.stop - offset] += torch.randn_like(
        x[:, rows.start - offset : rows.stop - offset]
    )
    return x


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_static_routing_by_behaviour(model: MusarTransformer, single: bool, backend: str) -> None:
    opts = RoutingOptions(backend=backend)
    x, t = _streams()
    with torch.no_grad():
        base_t, base_x = _attn_call(model, LAYOUT, opts, SPANS, single, x, t)
        # Perturb every condition token (CT in the text stream, CI in the image stream).
        x2 = _perturb(x, slice(LAYOUT.noise_slice.stop, LAYOUT.total), LAYOUT.text_len)
        t2 = _perturb(t, slice(LAYOUT.prompt, LAYOUT.text_len))
        new_t, _ = _attn_call(model, LAYOUT, opts, SPANS, single, x2, t2)
        assert torch.allclose(new_t[:, : LAYOUT.prompt], base_t[:, : LAYOUT.prompt], atol=1e-6)
        # Perturb condition 2 only: conditions 0 and 1 do not move.
        ct2, ci2 = LAYOUT.cond_slices(2)
        new_t, new_x = _attn_call(
            model, LAYOUT, opts, SPANS, single, _perturb(x, ci2, LAYOUT.text_len), _perturb(t, ct2)
        )
        for k in (0, 1):
            ct, ci = LAYOUT.cond_slices(k)
            assert torch.allclose(new_t[:, ct], base_t[:, ct], atol=1e-6)
            ci_rows = slice(ci.start - LAYOUT.text_len, ci.stop - LAYOUT.text_len)
            assert torch.allclose(new_x[:, ci_rows], base_x[:, ci_rows], atol=1e-6)
        assert not torch.allclose(new_t[:, ct2], base_t[:, ct2], atol=1e-4)


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_dynamic_routing_by_behaviour(model: MusarTransformer, single: bool, backend: str) -> None:
    records: list[RouteRecord] = []
    opts = RoutingOptions(backend=backend)
    x, t = _streams(1)
    with torch.no_grad():
        ctx_capture = RoutingContext(LAYOUT, opts, SPANS, capture=records.append)
        rotary = model.pos_embed(torch.zeros(LAYOUT.total, 3))
        q = torch.randn(1, 2, LAYOUT.total, 16)
        LayerRouting(ctx_capture, 0).attend(q, q, q)  # exercises capture
        assert records and records[0].routes.shape == (1, LAYOUT.noise)
        del rotary
        _, base_x = _attn_call(model, LAYOUT, opts, SPANS, single, x, t)
        routes = _capture_routes(model, opts, single, x, t)
        assert len(set(routes.tolist())) >= 2, "test needs noise tokens routed to different conditions"
        ct1, ci1 = LAYOUT.cond_slices(1)
        _, new_x = _attn_call(
            model, LAYOUT, opts, SPANS, single, _perturb(x, ci1, LAYOUT.text_len), _perturb(t, ct1)
        )
    noise_base, noise_new = base_x[0, : LAYOUT.noise], new_x[0, : LAYOUT.noise]
    same = (noise_base - noise_new).abs().amax(-1) < 1e-6
    assert torch.equal(same, routes != 1), "exactly the noise tokens not routed to condition 1 are unaffected"


def _capture_routes(model, opts, single, x, t) -> torch.Tensor:
    records: list[RouteRecord] = []
    ctx = RoutingContext(LAYOUT, opts, SPANS, capture=records.append)
    rotary = model.pos_embed(torch.zeros(LAYOUT.total, 3))
    if single:
        model.single_transformer_blocks[0].attn(
            hidden_states=torch.cat([t, x], 1), image_rotary_emb=rotary, routing=ctx.layer(2)
        )
    else:
        model.transformer_blocks[0].attn(
            hidden_states=x, encoder_hidden_states=t, image_rotary_emb=rotary, routing=ctx.layer(0)
        )
    return records[-1].routes[0]


def test_single_condition_is_unaffected_by_dynamic_routing(model: MusarTransformer) -> None:
    inputs = make_inputs(model, num_conditions=1)
    with torch.no_grad():
        on = model(**inputs, routing=RoutingOptions(dynamic=True)).sample
        off = model(**inputs, routing=RoutingOptions(dynamic=False)).sample
    assert torch.equal(on, off)


def test_dynamic_routing_changes_output_and_respects_start_layer(model: MusarTransformer) -> None:
    inputs = make_inputs(model, num_conditions=2)
    records: list[RouteRecord] = []
    with torch.no_grad():
        on = model(**inputs, routing=RoutingOptions(), capture=records.append).sample
        off = model(**inputs, routing=RoutingOptions(dynamic=False)).sample
        late = model(**inputs, routing=RoutingOptions(start_step=3), step_index=2).sample
    assert not torch.allclose(on, off)
    assert torch.equal(late, off)
    assert [r.layer for r in records] == [0, 1, 2, 3]


def test_independent_conditions_ignore_noise_through_the_model(model: MusarTransformer) -> None:
    """With independent conditions, condition hidden states never depend on NOISE or t."""
    seen: list[torch.Tensor] = []
    hooks = [
        b.proj_out.register_forward_hook(lambda m, i, o: seen.append(o))
        for b in model.single_transformer_blocks
    ]
    opts = RoutingOptions(independent_conditions=True)
    inputs = make_inputs(model, num_conditions=2)
    lay = TokenLayout(8, 16, (4, 4), (3, 3))
    with torch.no_grad():
        model(**inputs, routing=opts)
        first = [o.clone() for o in seen]
        seen.clear()
        inputs2 = dict(
            inputs, hidden_states=torch.randn_like(inputs["hidden_states"]), timestep=inputs["timestep"] * 0.3
        )
        model(**inputs2, routing=opts)
    for h in hooks:
        h.remove()
    cond_rows = torch.cat([torch.arange(s.start, s.stop) for k in range(2) for s in lay.cond_slices(k)])
    for a, b in zip(first, seen):
        assert torch.allclose(a[:, cond_rows], b[:, cond_rows], atol=1e-6)
        assert not torch.allclose(a[:, lay.noise_slice], b[:, lay.noise_slice])


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


CASES = [
    dict(c=1, opts={}),
    dict(c=2, opts={}),
    dict(c=3, opts={"dynamic": False}),
    dict(c=4, opts={}),
    dict(c=2, opts={"per_head": True}),
    dict(c=3, opts={"independent_conditions": True}),
    dict(c=2, opts={"static": False}),
    # Layout boxes (given routes): quadrant boxes plus an overlapping centre box on the 4 x 4 grid.
    dict(c=1, opts={}, boxes="all"),
    dict(c=2, opts={}, boxes="none"),
    dict(c=4, opts={"per_head": True}, boxes="all"),
    dict(c=3, opts={"independent_conditions": True}, boxes="none"),
    dict(c=2, opts={"static": False}, boxes="all"),
]
BOXES = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.25, 0.25, 0.75, 0.75)]


def _case_name(case: dict) -> str:
    return f"c{case['c']}-{'-'.join(case['opts']) or 'default'}" + (f"-boxes_{case['boxes']}" if "boxes" in case else "")


@pytest.mark.parametrize("case", CASES, ids=_case_name)
def test_fast_equals_reference_forward_and_backward(model: MusarTransformer, case: dict) -> None:
    inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    spans = [[(k, 1) for k in range(case["c"])], [(7 - k, 1) for k in range(case["c"])]]
    inputs = make_inputs(model, batch=2, num_conditions=case["c"], spans=spans)
    if "boxes" in case:
        cand = box_candidates(BOXES[: case["c"]], (4, 4), case["boxes"])[None].expand(2, -1, -1)
        with torch.no_grad():  # the boxes must matter here, or the comparison below proves nothing
            free = model(**inputs, routing=RoutingOptions(**case["opts"])).sample
            inputs["conditions"].candidates = cand
            boxed = model(**inputs, routing=RoutingOptions(**case["opts"])).sample
        assert not torch.allclose(free, boxed, atol=1e-4)
    results = {}
    for backend in ("reference", "fast"):
        m = copy.deepcopy(model).train()
        x = inputs["hidden_states"].clone().requires_grad_(True)
        out = m(
            **dict(inputs, hidden_states=x), routing=RoutingOptions(backend=backend, **case["opts"])
        ).sample
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        # Condition-row LoRA of the last layer legitimately gets no gradient (its rows are dropped).
        grads = {n: _grad(p) for n, p in m.named_parameters() if p.requires_grad}
        results[backend] = (out.detach(), x.grad, grads)
    (out_r, gx_r, g_r), (out_f, gx_f, g_f) = results["reference"], results["fast"]
    assert torch.allclose(out_f, out_r, atol=1e-5)
    assert torch.allclose(gx_f, gx_r, atol=1e-5)
    assert g_r.keys() == g_f.keys() and len(g_r) > 0
    for name in g_r:
        assert torch.allclose(g_f[name], g_r[name], atol=1e-5), name


def test_gradient_checkpointing_matches(model: MusarTransformer) -> None:
    inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    inputs = make_inputs(model, num_conditions=2)
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(model).train()
        if ckpt:
            m.enable_gradient_checkpointing()
        m(**inputs).sample.square().mean().backward()
        grads.append(torch.cat([_grad(p).flatten() for p in m.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
