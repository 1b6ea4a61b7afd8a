"""Quantised loading: ``--quantize`` / ``quantization_config`` through diffusers' own configs, with
the branch LoRA on top of the quantised linears.

CPU: torchao int8 and float8 weight-only on the tiny pipeline (and GGUF Q8_0 where the gguf
package is installed). GPU-marked: bitsandbytes nf4, and every mode in bf16 on CUDA.

Tolerances are relative L2 errors of the transformer output against the unquantised model on the
same inputs. Per-row int8 absmax scaling rounds each weight by at most max|w| / 254, an RMS weight
error of about 0.7% for Gaussian rows, which adds up through the tiny model's 3 blocks to ~1%
(measured 0.5%): the limit is 2%. float8 e4m3 keeps 3 mantissa bits, a relative rounding error of
up to 2^-4 per weight, ~3.6% RMS (measured 3.5% at the output): the limit is 8%. Q8_0 is int8 per
32-weight block, finer than per row: 2%. nf4 has 16 levels: 25%. A wrong weight, layout or
dequantisation gives errors of order 100%, so each limit still fails a broken path; every test
also checks that the weights really are quantised, so a silent no-op cannot pass.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from musar.errors import MusarError
from musar.lora import BranchLoRAConfig, BranchLoRALinear, RowPlan, inject_branch_lora, lora_named_parameters
from musar.lora.io import save_branch_lora
from musar.models.layout import TokenLayout
from musar.models.options import RoutingOptions
from musar.models.transformer import MusarTransformer
from musar.pipelines.presets import load_pipeline, tiny_pipeline
from musar.pipelines.quantization_spec import QUANTIZE_CHOICES, QuantizeSpec
from musar.pipelines.weight_stats import linear_weight_kinds, weight_bytes

from helpers import make_inputs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DOG, BACKPACK = str(EXAMPLES / "dog.jpg"), str(EXAMPLES / "backpack.jpg")
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install 'musar[quant]')")
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="gguf is not installed (pip install 'musar[quant]')")

TOLERANCE = {"int8wo": 0.02, "fp8wo": 0.08, "gguf": 0.02, "nf4": 0.25}
WEIGHT_CLASS = {"int8wo": "Int8Tensor", "fp8wo": "Float8Tensor", "nf4": "Params4bit", "gguf": "GGUFParameter"}
# tiny preset transformer: 6 time/text embedding + 2 embedder + 2 output + 14 (1 double block) + 2 x 6 (single)
N_LINEARS = 36


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A branch LoRA for the tiny preset with non-zero B, so it changes the output."""
    model = tiny_pipeline().transformer
    inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    _randomise_lora(model)
    return save_branch_lora(model, tmp_path_factory.mktemp("lora") / "lora.safetensors")


def _randomise_lora(model: nn.Module, branch: str | None = None, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_named_parameters(model):
            if branch is None or f".{branch}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _output(model: MusarTransformer, device: str = "cpu", dtype: torch.dtype = torch.float32, **kw: object) -> torch.Tensor:
    inputs = make_inputs(model, batch=1, num_conditions=2)
    inputs = {k: v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    cond = inputs["conditions"]
    for name in ("image_latents", "text_embeds", "image_ids"):
        setattr(cond, name, [t.to(device, dtype) for t in getattr(cond, name)])
    cond.spans = cond.spans.to(device)
    with torch.no_grad():
        return model(**inputs, **kw).sample


# ---- the --quantize value, checked before any model loads ----------------------------------


def test_quantize_values_parse_and_bad_ones_name_the_fix(tmp_path: Path) -> None:
    assert QuantizeSpec.parse("none") == QuantizeSpec() and not QuantizeSpec().enabled
    assert QuantizeSpec.parse("int8wo").mode == "int8wo"
    assert str(QuantizeSpec.parse("gguf:/x/flux.gguf")) == "gguf:/x/flux.gguf"
    assert "nf4" in QUANTIZE_CHOICES and "gguf:a.gguf" in QUANTIZE_CHOICES
    assert "int4" not in QUANTIZE_CHOICES and "gguf:" not in QUANTIZE_CHOICES
    with pytest.raises(MusarError, match="expected one of none, int8wo, fp8wo, nf4 or gguf:PATH"):
        QuantizeSpec.parse("int4")
    with pytest.raises(MusarError, match="GGUF file not found"):
        QuantizeSpec.parse(f"gguf:{tmp_path / 'missing.gguf'}").check("cpu")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(MusarError, match="not a GGUF file"):
        QuantizeSpec.parse(f"gguf:{fake}").check("cpu")
    # the argument check is the full header audit: a cut-off header and a FIFO are named at once
    fake.write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    with pytest.raises(MusarError, match=str(fake)):
        QuantizeSpec.parse(f"gguf:{fake}").check("cpu")
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(MusarError, match="not a regular file"):
        QuantizeSpec.parse(f"gguf:{fifo}").check("cpu")
    if importlib.util.find_spec("bitsandbytes") is not None:
        with pytest.raises(MusarError, match="CUDA GPUs only"):
            QuantizeSpec.parse("nf4").check("cpu")


def test_missing_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import musar.pipelines.quantization_spec as spec_module

    monkeypatch.setattr(spec_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MusarError, match=r"needs the torchao package: pip install 'musar\[quant\]'"):
        QuantizeSpec.parse("int8wo").check("cpu")
    with pytest.raises(MusarError, match=r"bitsandbytes package: pip install 'musar\[nf4\]'"):
        QuantizeSpec.parse("nf4").check("cuda")


def test_cli_rejects_bad_quantize_values_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from musar.cli import main

    base = ["generate", "--preset", "tiny", "--prompt", "a dog", "--subject", DOG, "a dog",
            "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as e:
        main([*base, "--quantize", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    assert main([*base, "--quantize", f"gguf:{tmp_path / 'none.gguf'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("musar generate: error: argument --quantize: GGUF file not found") and len(err) == 1
    assert not (tmp_path / "x.png").exists()


def test_ui_command_box_repeats_the_quantisation() -> None:
    from musar.ui.logic import ModelSource

    assert ModelSource(preset="tiny", quantize="int8wo").cli_args() == ["--preset", "tiny", "--quantize", "int8wo"]
    assert ModelSource(quantize="gguf:rel/flux.gguf").cli_args() == ["--quantize", f"gguf:{Path('rel/flux.gguf').resolve()}"]
    assert "--quantize" not in ModelSource().cli_args()


# ---- torchao on CPU: the tiny pipeline ----------------------------------------------------


@needs_torchao
@pytest.mark.parametrize("mode", ["int8wo", "fp8wo"])
def test_torchao_pipeline_is_close_smaller_and_keeps_its_lora(tiny_folder: Path, lora_file: Path, mode: str) -> None:
    plain = load_pipeline(model=tiny_folder, dtype="fp32", device="cpu", lora=lora_file)
    quant = load_pipeline(model=tiny_folder, dtype="fp32", device="cpu", lora=lora_file, quantize=mode)
    # Every linear of the transformer and of T5 holds a torchao tensor; the LoRA wraps them all.
    kinds = linear_weight_kinds(quant.transformer)
    assert kinds == {WEIGHT_CLASS[mode]: N_LINEARS}, kinds
    assert set(linear_weight_kinds(quant.text_encoder_2)) == {WEIGHT_CLASS[mode]}
    assert set(linear_weight_kinds(quant.text_encoder)) == {"Parameter"}  # CLIP stays as it is
    wrapped = [m for m in quant.transformer.modules() if isinstance(m, BranchLoRALinear)]
    assert len(wrapped) == 24 and all(type(m.base_layer.weight).__name__ == WEIGHT_CLASS[mode] for m in wrapped)
    assert all(p.dtype == torch.float32 and p.requires_grad for _, p in lora_named_parameters(quant.transformer))
    # Close to the unquantised output, LoRA included, and really different from it.
    err = _relative_error(_output(quant.transformer), _output(plain.transformer))
    assert 0 < err <= TOLERANCE[mode], err
    # The transformer's weights take less memory (float32 base: int8 / fp8 is ~1/4 per linear).
    assert weight_bytes(quant.transformer) < 0.5 * weight_bytes(plain.transformer)
    # The LoRA trains over the quantised base: gradients reach the same LoRA parameters as without
    # quantisation (text-stream layers have no NOISE rows, so their noise branch gets none in both).
    def trained(pipe: object) -> set[str]:
        model = pipe.transformer  # type: ignore[attr-defined]
        model(**make_inputs(model, num_conditions=2)).sample.square().mean().backward()
        return {n for n, p in lora_named_parameters(model) if p.grad is not None and p.grad.abs().sum() > 0}

    reached = trained(quant)
    assert reached == trained(plain) and len(reached) > 24


@needs_torchao
def test_model_level_config_quantises_the_transformer_only(tiny_folder: Path) -> None:
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from musar.pipelines.pipeline_musar import MusarPipeline

    pipe = MusarPipeline.from_pretrained(tiny_folder, dtype=torch.float32, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    assert set(linear_weight_kinds(pipe.transformer)) == {"Int8Tensor"}
    assert set(linear_weight_kinds(pipe.text_encoder_2)) == {"Parameter"}
    with pytest.raises(MusarError, match="quantization_config must be"):
        MusarPipeline.from_pretrained(tiny_folder, quantization_config={"load_in_4bit": True})


@needs_torchao
@pytest.mark.parametrize(
    ("stream", "groups"),
    [("image", [(4, "noise"), (4, "subject")]), ("joint", [(3, None), (2, "subject"), (4, "noise"), (4, "subject")])],
)
def test_lora_rows_over_a_quantised_linear(stream: str, groups: list) -> None:
    """The row rule of docs/design.md sec. 5 holds with a torchao int8 base: PROMPT rows exactly the
    (quantised) base, NOISE rows base + noise delta, condition rows base + subject delta."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    quantize_(base, Int8WeightOnlyConfig())
    plan = RowPlan()
    plan.set(TokenLayout(prompt=3, noise=4, cond_image=(2, 2), cond_text=(1, 1)))
    layer = BranchLoRALinear(base, BranchLoRAConfig(noise_rank=2, subject_rank=3), stream, plan)  # type: ignore[arg-type]
    for b in layer.lora_B.values():
        nn.init.normal_(b.weight)
    x = torch.randn(2, sum(n for n, _ in groups), 32)
    out, plain = layer(x), base(x)
    pos = 0
    for n, branch in groups:
        rows = slice(pos, pos + n)
        expected = plain[:, rows] if branch is None else plain[:, rows] + layer.delta(branch, x[:, rows])
        assert torch.equal(out[:, rows], expected) if branch is None else torch.allclose(out[:, rows], expected, atol=1e-6)
        pos += n


@needs_torchao
def test_branch_changes_stay_in_their_rows_on_a_quantised_model(tiny_folder: Path) -> None:
    """Model level: a subject-branch change never reaches a forward without conditions, and a
    noise-branch change never reaches the condition K/V (independent conditions, cached)."""
    pipe = load_pipeline(model=tiny_folder, dtype="fp32", device="cpu", quantize="int8wo")
    model = pipe.transformer
    inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    inputs = make_inputs(model, num_conditions=2)
    cond = inputs.pop("conditions")
    opts = RoutingOptions(independent_conditions=True)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            out = model(**inputs).sample
            cache = model.build_condition_cache(cond, inputs["pooled_projections"], inputs["guidance"], routing=opts)
        return out, [k.clone() for k in cache.keys.values()]

    out0, keys0 = run()
    _randomise_lora(model, "subject", seed=1)
    out1, keys1 = run()
    assert torch.equal(out1, out0)  # no condition rows, no subject branch
    assert any(not torch.equal(a, b) for a, b in zip(keys1, keys0))
    _randomise_lora(model, "noise", seed=2)
    out2, keys2 = run()
    assert not torch.allclose(out2, out1, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(keys2, keys1))  # condition rows never see the noise branch


@needs_torchao
def test_cli_generates_with_int8wo(tmp_path: Path) -> None:
    import json

    from musar.cli import main

    out = tmp_path / "q.png"
    code = main(["generate", "--preset", "tiny", "--quantize", "int8wo", "--prompt", "a dog and a red backpack",
                 "--subject", DOG, "a dog", "--subject", BACKPACK, "a red backpack",
                 "--steps", "2", "--height", "64", "--width", "64", "--out", str(out)])
    assert code == 0 and out.is_file()
    assert json.loads(out.with_suffix(".json").read_text())["quantize"] == "int8wo"


# ---- GGUF Q8_0 (CPU where gguf is installed) ------------------------------------------------


@needs_gguf
def test_q8_0_bytes_equal_gguf_reference() -> None:
    import gguf

    from musar.pipelines.gguf import q8_0_bytes

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * 0.05
    w[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    w[1, 5] = 3.0  # an outlier sets its block's scale
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(q8_0_bytes(w), torch.from_numpy(ref))


@needs_gguf
def test_gguf_transformer_is_close_and_takes_the_lora(tiny_folder: Path, lora_file: Path, tmp_path: Path) -> None:
    from musar.pipelines.gguf import write_gguf

    plain = load_pipeline(model=tiny_folder, dtype="fp32", device="cpu", lora=lora_file)
    path = write_gguf(tiny_pipeline().transformer.state_dict(), tmp_path / "tiny-Q8_0.gguf")
    quant = load_pipeline(model=tiny_folder, dtype="fp32", device="cpu", lora=lora_file, quantize=f"gguf:{path}")
    kinds = linear_weight_kinds(quant.transformer)
    assert kinds.get("GGUFParameter", 0) >= 20, kinds  # every linear whose rows split into 32-blocks
    wrapped = [m for m in quant.transformer.modules() if isinstance(m, BranchLoRALinear)]
    assert len(wrapped) == 24 and all(p.dtype == torch.float32 for _, p in lora_named_parameters(quant.transformer))
    err = _relative_error(_output(quant.transformer), _output(plain.transformer))
    assert 0 < err <= TOLERANCE["gguf"], err
    assert weight_bytes(quant.transformer) < 0.5 * weight_bytes(plain.transformer)


# ---- CUDA: every mode in bf16, nf4 included -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8wo", "fp8wo", "nf4", "gguf"])
def test_gpu_quantised_pipeline_generates_and_trains_lora(tiny_folder: Path, lora_file: Path, tmp_path: Path, mode: str) -> None:
    from musar.pipelines.gguf import write_gguf

    spec = mode
    if mode == "gguf":
        spec = f"gguf:{write_gguf(tiny_pipeline().transformer.state_dict(), tmp_path / 'tiny.gguf')}"
    plain = load_pipeline(model=tiny_folder, dtype="bf16", device="cuda", lora=lora_file)
    quant = load_pipeline(model=tiny_folder, dtype="bf16", device="cuda", lora=lora_file, quantize=spec)
    assert WEIGHT_CLASS[mode] in linear_weight_kinds(quant.transformer)
    assert quant.transformer.device.type == "cuda"
    err = _relative_error(_output(quant.transformer, "cuda", torch.bfloat16), _output(plain.transformer, "cuda", torch.bfloat16))
    assert 0 < err <= TOLERANCE[mode], err
    # LoRA gradients flow over the quantised base (bf16 LoRA in the layer's compute dtype) to the
    # same parameters as without quantisation.
    assert all(p.dtype == torch.bfloat16 for _, p in lora_named_parameters(quant.transformer))

    def trained(model: MusarTransformer) -> set[str]:
        inputs = make_inputs(model, num_conditions=2)
        inputs = {k: v.cuda().to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in inputs.items()}
        cond = inputs["conditions"]
        for name in ("image_latents", "text_embeds", "image_ids"):
            setattr(cond, name, [t.cuda().to(torch.bfloat16) for t in getattr(cond, name)])
        cond.spans = cond.spans.cuda()
        model(**inputs).sample.float().square().mean().backward()
        grads = {n: p.grad for n, p in lora_named_parameters(model) if p.grad is not None}
        assert all(torch.isfinite(g).all() for g in grads.values())
        return {n for n, g in grads.items() if g.abs().sum() > 0}

    reached = trained(quant.transformer)
    assert reached == trained(plain.transformer) and len(reached) > 24
    image = quant(prompt="a dog and a red backpack", subjects=[(DOG, "a dog"), (BACKPACK, "a red backpack")],
                  height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


@pytest.mark.gpu
@needs_gguf
def test_gpu_q8_0_bytes_equal_cpu_bytes() -> None:
    from musar.pipelines.gguf import q8_0_bytes

    w = torch.randn(256, 3072, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert torch.equal(q8_0_bytes(w.cuda()).cpu(), q8_0_bytes(w))
