"""MusarTransformer keeps FluxTransformer2DModel's contract (issue 23, item 1).

``joint_attention_kwargs`` (LoRA ``scale`` and MUSAR's own inputs), a user's gradient
checkpointing function, and fused QKV projections, all checked by behaviour on tiny random models.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from torch.utils.checkpoint import checkpoint

from musar.errors import MusarError
from musar.lora import BranchLoRAConfig, inject_branch_lora
from musar.models.attention import MusarAttnProcessor, RouteRecord
from musar.models.options import RoutingOptions
from musar.models.transformer import MusarTransformer

from helpers import make_inputs

ATOL = 1e-5  # fp32: fused and separate projections differ only in summation order


@pytest.fixture
def model(tiny_flux_config: dict) -> MusarTransformer:
    torch.manual_seed(0)
    return MusarTransformer(**tiny_flux_config).eval()


def _with_branch_lora(model: MusarTransformer) -> MusarTransformer:
    """``model`` with a MUSAR branch LoRA whose B weights are nonzero (so it changes outputs)."""
    inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _add_peft_lora(model: torch.nn.Module) -> None:
    """A standard (peft) LoRA added through diffusers' adapter API, random nonzero weights."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp"]
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False), "style")


def _run(model: MusarTransformer, inputs: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).sample


# --- joint_attention_kwargs: scale ------------------------------------------------------------


def test_scale_weights_the_branch_lora_for_one_call(model: MusarTransformer) -> None:
    base = copy.deepcopy(model)
    model = _with_branch_lora(model)
    plan = model.lora_plan
    inputs = make_inputs(model, num_conditions=2)

    full = _run(model, inputs)
    half = _run(model, inputs, joint_attention_kwargs={"scale": 0.5})
    assert plan.branch_scale == 1.0, "the branch weight is restored after the call"
    plan.branch_scale = 0.5
    assert torch.equal(half, _run(model, inputs))
    assert not torch.allclose(half, full, atol=1e-4), "the LoRA must matter, or this proves nothing"

    # scale multiplies the weight set_adapters gave the branch, as peft's scale_layer does.
    plan.branch_scale = 0.8
    expected = _run(model, inputs, joint_attention_kwargs={})  # weight 0.8
    plan.branch_scale = 0.4
    expected_half = _run(model, inputs)
    plan.branch_scale = 0.8
    assert torch.equal(_run(model, inputs, joint_attention_kwargs={"scale": 0.5}), expected_half)
    assert plan.branch_scale == 0.8 and not torch.equal(expected, expected_half)

    plan.branch_scale = 1.0
    off = _run(model, inputs, joint_attention_kwargs={"scale": 0.0})
    assert torch.allclose(off, _run(base, inputs), atol=1e-6, rtol=0)


def test_scale_is_restored_when_the_forward_raises(model: MusarTransformer) -> None:
    model = _with_branch_lora(model)
    inputs = make_inputs(model, num_conditions=2)
    inputs["conditions"].candidates = torch.ones(1, 3, 2, dtype=torch.bool)  # 3 != 16 NOISE tokens
    with pytest.raises(ValueError, match="route candidates"):
        _run(model, inputs, joint_attention_kwargs={"scale": 0.5})
    assert model.lora_plan.branch_scale == 1.0


def test_scale_weights_peft_loras_as_diffusers_does(model: MusarTransformer, tiny_flux_config: dict) -> None:
    """Same weights, same peft LoRA: MusarTransformer == FluxTransformer2DModel under ``scale``."""
    flux = FluxTransformer2DModel(**tiny_flux_config).eval()
    _add_peft_lora(flux)
    _add_peft_lora(model)
    model.load_state_dict(flux.state_dict())
    inputs = make_inputs(model, batch=2)
    kwargs = {"joint_attention_kwargs": {"scale": 0.5}}
    with torch.no_grad():
        expected_full, expected_half = flux(**inputs).sample, flux(**inputs, **kwargs).sample
    assert not torch.allclose(expected_full, expected_half, atol=1e-4)
    assert torch.allclose(_run(model, inputs, **kwargs), expected_half, atol=1e-6, rtol=0)
    assert torch.allclose(_run(model, inputs), expected_full, atol=1e-6, rtol=0), "scale undone after the call"

    # With conditions too: scale 0.5 equals the adapter weighted 0.5 by set_adapters.
    cond = make_inputs(model, num_conditions=2)
    half = _run(model, cond, **kwargs)
    model.set_adapters(["style"], [0.5])
    assert torch.allclose(half, _run(model, cond), atol=1e-6, rtol=0)


# --- joint_attention_kwargs: MUSAR's inputs ---------------------------------------------------


def test_musar_inputs_through_joint_attention_kwargs(model: MusarTransformer) -> None:
    inputs = make_inputs(model, num_conditions=2)
    conditions = inputs.pop("conditions")
    routing = RoutingOptions(start_step=1)
    explicit_records: list[RouteRecord] = []
    joint_records: list[RouteRecord] = []
    explicit = _run(
        model, inputs, conditions=conditions, routing=routing, step_index=1, capture=explicit_records.append
    )
    joint = {"conditions": conditions, "routing": routing, "step_index": 1, "capture": joint_records.append}
    given = dict(joint)
    assert torch.equal(_run(model, inputs, joint_attention_kwargs=joint), explicit)
    assert joint == given, "the caller's dict is not changed (FluxPipeline passes it every step)"
    assert [r.layer for r in joint_records] == [r.layer for r in explicit_records] == [0, 1, 2, 3]
    for a, b in zip(joint_records, explicit_records):
        assert torch.equal(a.routes, b.routes)
    # step_index really travels: at step 0 start_step=1 keeps dynamic routing off.
    assert not torch.equal(_run(model, inputs, joint_attention_kwargs={**joint, "step_index": 0}), explicit)

    options = RoutingOptions(independent_conditions=True)
    cache = model.build_condition_cache(conditions, inputs["pooled_projections"], inputs["guidance"], options)
    cached = _run(model, inputs, condition_cache=cache)
    assert torch.equal(_run(model, inputs, joint_attention_kwargs={"condition_cache": cache}), cached)


def test_joint_attention_kwargs_refuses_ambiguity(model: MusarTransformer) -> None:
    inputs = make_inputs(model, num_conditions=1)
    with pytest.raises(MusarError, match="both as arguments and in joint_attention_kwargs"):
        _run(model, inputs, joint_attention_kwargs={"conditions": inputs["conditions"]})
    with pytest.raises(MusarError, match="not supported by MusarTransformer"):
        _run(model, inputs, joint_attention_kwargs={"ip_adapter_image_embeds": [torch.zeros(1)]})


# --- gradient checkpointing -------------------------------------------------------------------


def test_custom_gradient_checkpointing_function(model: MusarTransformer) -> None:
    model = _with_branch_lora(model)
    inputs = make_inputs(model, num_conditions=2)
    calls: list[object] = []

    def recording_checkpoint(fn: Any, *args: Any) -> Any:
        calls.append(args[0])  # the block being run
        return checkpoint(fn, *args, use_reentrant=False)

    grads = []
    for func in (None, recording_checkpoint):
        m = copy.deepcopy(model).train()
        if func is not None:
            m.enable_gradient_checkpointing(gradient_checkpointing_func=func)
        m(**inputs).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        if func is not None:
            blocks = [*m.transformer_blocks, *m.single_transformer_blocks]
            assert len(calls) == len(blocks) and all(a is b for a, b in zip(calls, blocks))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_default_gradient_checkpointing_function_runs_the_musar_blocks(model: MusarTransformer) -> None:
    """diffusers' default function (``checkpoint(module.__call__, *args)``) gets a callable it can run."""
    model = _with_branch_lora(model).train()
    inputs = make_inputs(model, num_conditions=2)
    reference = model(**inputs).sample
    model.enable_gradient_checkpointing()
    assert torch.allclose(model(**inputs).sample, reference, atol=1e-6)


# --- fused QKV projections --------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("num_conditions", [0, 2])
def test_fused_qkv_equals_unfused(model: MusarTransformer, num_conditions: int, backend: str) -> None:
    inputs = make_inputs(model, batch=2, num_conditions=num_conditions, spans=[[(1, 2), (4, 2)]] * 2)
    routing = RoutingOptions(backend=backend)
    unfused = _run(model, inputs, routing=routing)

    model.fuse_qkv_projections()
    assert all(isinstance(p, MusarAttnProcessor) for p in model.attn_processors.values())
    fused = _run(model, inputs, routing=routing)
    assert torch.allclose(fused, unfused, atol=ATOL, rtol=0)

    # The fused projections are the ones used: changing one changes the output.
    attn = model.single_transformer_blocks[0].attn
    saved = attn.to_qkv.weight.detach().clone()
    with torch.no_grad():
        attn.to_qkv.weight.mul_(2.0)
    assert not torch.allclose(_run(model, inputs, routing=routing), fused, atol=1e-4)
    with torch.no_grad():
        attn.to_qkv.weight.copy_(saved)

    model.unfuse_qkv_projections()
    assert torch.equal(_run(model, inputs, routing=routing), unfused)


def test_fused_qkv_never_drops_a_lora(model: MusarTransformer) -> None:
    inputs = make_inputs(model, num_conditions=1)
    lora_first = _with_branch_lora(copy.deepcopy(model))
    with pytest.raises(MusarError, match="fused projections would drop"):
        lora_first.fuse_qkv_projections()
    model.fuse_qkv_projections()
    _with_branch_lora(model)  # a LoRA on q/k/v after fusing: the fused copies do not have it
    with pytest.raises(MusarError, match="unfuse_qkv_projections"):
        _run(model, inputs)
    model.unfuse_qkv_projections()
    assert torch.equal(_run(model, inputs), _run(lora_first, inputs))
