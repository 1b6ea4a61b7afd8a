"""Processors installed once, and every routed kernel call through diffusers' attention dispatch.

The oracle is the same model in float64 with the dense-mask ``reference`` routing: every CPU
attention backend, under every routing backend, must land on it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    attention_backend,
)
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from musar.errors import MusarError
from musar.models.attention import MusarAttnProcessor
from musar.models.boxes import box_candidates
from musar.models.options import RoutingOptions
from musar.models.transformer import MusarTransformer

from helpers import make_inputs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SPANS = [[(0, 1), (1, 1), (2, 1)], [(7, 1), (6, 1), (5, 1)]]


@pytest.fixture(autouse=True)
def _restore_active_backend() -> Iterator[None]:
    # set_attention_backend also changes diffusers' process-wide active backend.
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = active


@pytest.fixture
def model(tiny_flux_config: dict) -> MusarTransformer:
    torch.manual_seed(0)
    model = MusarTransformer(**tiny_flux_config).eval()
    with torch.no_grad():  # weights large enough that routing visibly matters
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def _processors(model: MusarTransformer) -> list:
    return [b.attn.processor for b in (*model.transformer_blocks, *model.single_transformer_blocks)]


def _inputs(model: MusarTransformer, c: int = 3, dtype: torch.dtype = torch.float32) -> dict:
    inputs = make_inputs(model, batch=2, num_conditions=c, spans=[s[:c] for s in SPANS] if c else None)
    out = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    if c:
        cond = out["conditions"]
        cond.image_latents = [x.to(dtype) for x in cond.image_latents]
        cond.text_embeds = [x.to(dtype) for x in cond.text_embeds]
    return out


def _forward(model: MusarTransformer, inputs: dict, routing: str = "fast", **opts: object) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, routing=RoutingOptions(backend=routing, **opts)).sample


# ---- processors: installed once, a user's choice kept --------------------------------------


def test_processors_are_installed_at_construction_and_loading(model: MusarTransformer, tmp_path: Path) -> None:
    assert all(isinstance(p, MusarAttnProcessor) for p in _processors(model))
    model.save_pretrained(tmp_path / "t")
    loaded = MusarTransformer.from_pretrained(tmp_path / "t")
    assert all(isinstance(p, MusarAttnProcessor) for p in _processors(loaded))
    assert torch.equal(_forward(loaded, _inputs(loaded)), _forward(model, _inputs(model)))
    before = _processors(model)
    _forward(model, _inputs(model))
    assert all(a is b for a, b in zip(before, _processors(model))), "a forward replaced a processor"


class CountingFluxProcessor(FluxAttnProcessor):
    calls = 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        CountingFluxProcessor.calls += 1
        return super().__call__(*args, **kwargs)


def test_a_users_processor_is_kept_and_used_without_conditions(model: MusarTransformer) -> None:
    inputs = _inputs(model, c=0)
    expected = _forward(model, inputs)
    model.set_attn_processor(CountingFluxProcessor())
    CountingFluxProcessor.calls = 0
    got = _forward(model, inputs)
    assert CountingFluxProcessor.calls == 4, "every layer ran the user's processor"
    assert all(isinstance(p, CountingFluxProcessor) for p in _processors(model))
    assert torch.equal(got, expected)  # MUSAR's processor unrouted is FLUX's, bit for bit


def test_conditions_refuse_a_processor_that_cannot_route(model: MusarTransformer) -> None:
    inputs = _inputs(model)
    expected = _forward(model, inputs)
    model.set_attn_processor(FluxAttnProcessor())
    with pytest.raises(MusarError, match=r"^transformer_blocks\.0\.attn uses FluxAttnProcessor, which cannot route"):
        _forward(model, inputs)
    cond = inputs["conditions"]
    with pytest.raises(MusarError, match="use_musar_attention"):
        model.build_condition_cache(cond, inputs["pooled_projections"], inputs["guidance"])
    model.set_attention_backend("_native_math")  # chosen while FLUX's processors were installed ...
    model.use_musar_attention()
    math = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]
    calls: list[int] = []
    _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH] = lambda **kw: calls.append(1) or math(**kw)
    try:
        _AttentionBackendRegistry._active_backend = AttentionBackendName.NATIVE
        got = _forward(model, inputs)
    finally:
        _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH] = math
    assert calls, "... and carried over to MUSAR's processors"
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


# ---- dispatch: default == native, every CPU backend on the float64 oracle -------------------


@pytest.mark.parametrize("routing", ["fast", "reference", "flex"])
@pytest.mark.parametrize("c", [0, 3])
def test_native_backend_equals_the_default(model: MusarTransformer, routing: str, c: int) -> None:
    inputs = _inputs(model, c)
    default = _forward(model, inputs, routing, per_head=c > 0)
    model.set_attention_backend("native")
    assert torch.equal(_forward(model, inputs, routing, per_head=c > 0), default)


def _oracle(model: MusarTransformer, inputs: dict, **opts: object) -> torch.Tensor:
    m64 = copy.deepcopy(model).double()
    return _forward(m64, _inputs(m64, inputs["conditions"].num, torch.float64), "reference", **opts).float()


@pytest.mark.parametrize("kernel", ["native", "_native_math", "flex"])
@pytest.mark.parametrize("routing", ["fast", "reference"])
@pytest.mark.parametrize("opts", [{}, {"per_head": True, "independent_conditions": True}], ids=["mean", "per_head-indep"])
def test_cpu_attention_backends_match_the_float64_oracle(
    model: MusarTransformer, kernel: str, routing: str, opts: dict
) -> None:
    inputs = _inputs(model)
    oracle = _oracle(model, inputs, **opts)
    default = _forward(model, inputs, routing, **opts)
    assert not torch.allclose(default, _forward(model, inputs, routing, dynamic=False, **opts), atol=1e-3), (
        "routing must matter here, or the comparison proves nothing"
    )
    model.set_attention_backend(kernel)
    got = _forward(model, inputs, routing, **opts)
    assert torch.allclose(got, oracle, atol=2e-5, rtol=0), (got - oracle).abs().max()


def test_the_attention_backend_context_manager_is_honoured_by_every_call(model: MusarTransformer) -> None:
    """A spy behind ``_native_math`` counts the calls that reach it, per routing backend."""
    math = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]
    calls: list[int] = []

    def spy(**kwargs: object) -> torch.Tensor:
        calls.append(1)
        return math(**kwargs)

    counts = {}
    _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH] = spy
    try:
        for c, routing in ((0, "fast"), (3, "fast"), (3, "reference"), (3, "flex")):
            inputs = _inputs(model, c)
            expected = _forward(model, inputs, routing)
            calls.clear()
            with attention_backend("_native_math"):
                got = _forward(model, inputs, routing)
            counts[c, routing] = len(calls)
            assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    finally:
        _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH] = math
    layers, probe = 4, 1  # a routed forward first probes its backend with one token
    assert counts[0, "fast"] == layers  # FLUX's own call
    assert counts[3, "reference"] == probe + 2 * layers  # S* + the masked call
    assert counts[3, "flex"] == probe + layers  # S* (the routed call is FlexAttention itself)
    # S*, PROMPT, 3 conditions, and at least one NOISE call per sample
    assert counts[3, "fast"] >= probe + (1 + 1 + 3 + 2) * layers


# ---- errors: one line, naming the backend ---------------------------------------------------


def _set_backend(model: MusarTransformer, name: str) -> None:
    """What ``set_attention_backend`` does, without its checks (a backend set some other way)."""
    for p in _processors(model):
        p._attention_backend = name


@pytest.mark.parametrize(
    ("backend", "dtype", "routing", "message"),
    [
        ("nope", torch.float32, "fast", r"^unknown attention backend 'nope'; expected one of .*native"),
        ("flash", torch.float32, "fast", r"^attention backend 'flash' cannot run MUSAR's 'fast' routing on cpu in float32: .*flash-attn"),
        ("_native_cudnn", torch.float32, "flex", r"^attention backend '_native_cudnn' cannot run .*bfloat16 or float16"),
        ("_native_efficient", torch.float32, "reference", r"^attention backend '_native_efficient' cannot run .* on cpu .*No viable backend"),
        ("_native_flash", torch.bfloat16, "reference", r"^attention backend '_native_flash' cannot take the mask of MUSAR's 'reference' routing"),
    ],
    ids=["unknown", "not-installed", "wrong-dtype", "no-kernel-here", "no-mask"],
)
def test_an_unusable_backend_is_refused_in_one_line(
    model: MusarTransformer, backend: str, dtype: torch.dtype, routing: str, message: str
) -> None:
    model = model.to(dtype)
    inputs = _inputs(model, dtype=dtype)
    _set_backend(model, backend)
    with pytest.raises(MusarError, match=message) as err:
        _forward(model, inputs, routing)
    assert "\n" not in str(err.value)


def test_diffusers_refuses_unknown_names_itself(model: MusarTransformer) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        model.set_attention_backend("nope")
    with pytest.raises(ValueError, match="not registered"), attention_backend("nope"):
        pass


def test_a_usable_backend_in_bf16_runs_the_fast_path(model: MusarTransformer) -> None:
    """``_native_flash`` (CPU flash kernel, bf16) serves fast routing: no mask anywhere."""
    model = model.to(torch.bfloat16)
    inputs = _inputs(model, dtype=torch.bfloat16)
    expected = _forward(model, inputs, "fast").float()
    _set_backend(model, "_native_flash")
    got = _forward(model, inputs, "fast").float()
    assert torch.allclose(got, expected, atol=0.05, rtol=0.05)


# ---- GPU: the kernels a CPU cannot run --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("kernel", "routing"),
    [("_native_cudnn", "fast"), ("_native_flash", "fast"), ("_native_efficient", "fast"),
     ("_native_efficient", "reference"), ("native", "flex")],
)
def test_gpu_attention_backends_serve_routing_in_bf16(tiny_flux_config: dict, kernel: str, routing: str) -> None:
    torch.manual_seed(0)
    model = MusarTransformer(**tiny_flux_config).cuda().eval()
    inputs = _inputs(model)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    cond = inputs["conditions"]
    for name in ("image_latents", "text_embeds", "image_ids"):
        setattr(cond, name, [t.cuda() for t in getattr(cond, name)])
    cond.spans = cond.spans.cuda()
    # Disjoint boxes fix every token's route, so bf16 cannot flip a near-tie of S*.
    quadrants = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0)]
    cond.candidates = box_candidates(quadrants, (4, 4), "none")[None].expand(2, -1, -1).cuda()
    expected = _forward(model, inputs, "reference")  # float32, native
    model = model.to(torch.bfloat16)
    bf16 = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    cond.image_latents = [x.to(torch.bfloat16) for x in cond.image_latents]
    cond.text_embeds = [x.to(torch.bfloat16) for x in cond.text_embeds]
    model.set_attention_backend(kernel)
    got = _forward(model, bf16, routing).float()
    assert torch.allclose(got, expected, atol=5e-2, rtol=5e-2), (got - expected).abs().max()
