"""Dual-branch LoRA: rows, injection, save/load round trip and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from musar.errors import MusarError
from musar.lora import (
    DEFAULT_TARGETS,
    BranchLoRAConfig,
    BranchLoRALinear,
    RowPlan,
    inject_branch_lora,
    lora_named_parameters,
)
from musar.lora.io import load_branch_lora, read_lora_config, save_branch_lora
from musar.lora.model import stream_of
from musar.models.layout import TokenLayout
from musar.models.transformer import MusarTransformer

from helpers import make_inputs

LAYOUT = TokenLayout(prompt=3, noise=4, cond_image=(2, 2), cond_text=(1, 1))


def _wrapped(stream: str, mode: str = "dual") -> BranchLoRALinear:
    torch.manual_seed(0)
    plan = RowPlan(mode)
    plan.set(LAYOUT)
    layer = BranchLoRALinear(
        nn.Linear(5, 7), BranchLoRAConfig(noise_rank=2, subject_rank=3, mode=mode), stream, plan
    )  # type: ignore[arg-type]
    for b in layer.lora_B.values():
        nn.init.normal_(b.weight)
    return layer


@pytest.mark.parametrize(
    ("stream", "groups"),
    [
        ("image", [(4, "noise"), (4, "subject")]),
        ("text", [(3, None), (2, "subject")]),
        ("joint", [(3, None), (2, "subject"), (4, "noise"), (4, "subject")]),
    ],
)
def test_each_row_gets_only_its_branch(stream: str, groups: list) -> None:
    layer = _wrapped(stream)
    x = torch.randn(2, sum(n for n, _ in groups), 5)
    out = layer(x)
    base = layer.base_layer(x)
    pos = 0
    for n, branch in groups:
        rows = slice(pos, pos + n)
        if branch is None:
            assert torch.equal(out[:, rows], base[:, rows])  # PROMPT rows: exactly the base output
        else:
            expected = base[:, rows] + layer.delta(branch, x[:, rows])
            assert torch.allclose(out[:, rows], expected, atol=1e-6)
            other = "subject" if branch == "noise" else "noise"
            assert not torch.allclose(out[:, rows], base[:, rows] + layer.delta(other, x[:, rows]), atol=1e-4)
        pos += n


def test_shared_mode_adapts_every_row() -> None:
    layer = _wrapped("text", mode="shared")
    x = torch.randn(1, 5, 5)
    assert torch.allclose(layer(x), layer.base_layer(x) + layer.delta("shared", x), atol=1e-6)


def test_row_count_mismatch_is_reported() -> None:
    with pytest.raises(RuntimeError, match="expects 8"):
        _wrapped("image")(torch.randn(1, 6, 5))
    with pytest.raises(RuntimeError, match="token layout"):
        BranchLoRALinear(nn.Linear(5, 7), BranchLoRAConfig(), "image", RowPlan())(torch.randn(1, 3, 5))


def test_streams_of_default_targets() -> None:
    assert stream_of("x_embedder") == "image" and stream_of("context_embedder") == "text"
    assert stream_of("transformer_blocks.3.attn.add_k_proj") == "text"
    assert stream_of("transformer_blocks.3.attn.to_add_out") == "text"
    assert stream_of("transformer_blocks.3.ff_context.net.2") == "text"
    assert stream_of("transformer_blocks.3.ff.net.0.proj") == "image"
    assert stream_of("single_transformer_blocks.0.proj_out") == "joint"


@pytest.fixture
def model(tiny_flux_config: dict) -> MusarTransformer:
    torch.manual_seed(0)
    return MusarTransformer(**tiny_flux_config)


def test_injection_covers_targets_and_freezes_base(model: MusarTransformer) -> None:
    inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BranchLoRALinear)]
    # 2 embedders + 2 double blocks x 12 + 2 single blocks x 5
    assert len(wrapped) == 2 + 2 * 12 + 2 * 5
    assert len(DEFAULT_TARGETS) == 2 + 12 + 5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora_named_parameters(model)}
    assert "transformer_blocks.0.attn.to_q.lora_A.noise.weight" in trainable
    assert model.transformer_blocks[0].attn.to_q.lora_A["subject"].weight.shape == (4, 32)
    with pytest.raises(ValueError, match="already"):
        inject_branch_lora(model, BranchLoRAConfig())
    with pytest.raises(ValueError, match="match no linear"):
        inject_branch_lora(
            MusarTransformer(
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=8,
                num_attention_heads=1,
                in_channels=4,
                joint_attention_dim=8,
                pooled_projection_dim=4,
                axes_dims_rope=(2, 2, 4),
            ),
            BranchLoRAConfig(targets=("nothing.*",)),
        )


def _randomise(model: nn.Module) -> None:
    for _, p in lora_named_parameters(model):
        nn.init.normal_(p, std=0.1)


def test_save_load_round_trip_is_exact(
    model: MusarTransformer, tiny_flux_config: dict, tmp_path: Path
) -> None:
    cfg = BranchLoRAConfig(noise_rank=2, subject_rank=4, subject_alpha=8.0)
    inject_branch_lora(model, cfg)
    _randomise(model)
    path = save_branch_lora(model, tmp_path / "lora.safetensors", {"base_model": "tiny"})
    assert read_lora_config(path) == cfg
    # Same base weights in a fresh, un-injected model (wrapped linears keep theirs under base_layer).
    fresh2 = MusarTransformer(**tiny_flux_config)
    base_sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    fresh2.load_state_dict(base_sd)
    assert load_branch_lora(fresh2, path) == cfg
    for (n1, p1), (n2, p2) in zip(lora_named_parameters(model), lora_named_parameters(fresh2)):
        assert n1 == n2 and torch.equal(p1, p2)
    inputs = make_inputs(model, num_conditions=2)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, fresh2(**inputs).sample)


def test_bad_lora_files_give_clear_errors(
    model: MusarTransformer, tiny_flux_config: dict, tmp_path: Path
) -> None:
    with pytest.raises(MusarError, match="not found"):
        load_branch_lora(model, tmp_path / "missing.safetensors")
    pickled = tmp_path / "weights.bin"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(MusarError, match="not a safetensors file"):
        load_branch_lora(model, pickled)
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain))
    with pytest.raises(MusarError, match="not a MUSAR branch LoRA"):
        load_branch_lora(model, plain)

    other = MusarTransformer(**dict(tiny_flux_config, num_attention_heads=3))
    inject_branch_lora(other, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    wrong_shape = save_branch_lora(other, tmp_path / "wide.safetensors")
    with pytest.raises(MusarError, match="has shape"):
        load_branch_lora(model, wrong_shape)
    assert model.lora_config is None, "a failed load leaves the model untouched"

    deeper = MusarTransformer(**dict(tiny_flux_config, num_layers=3))
    inject_branch_lora(deeper, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    with pytest.raises(MusarError, match="unknown keys"):
        load_branch_lora(model, save_branch_lora(deeper, tmp_path / "deep.safetensors"))

    broken = tmp_path / "broken.safetensors"
    save_file(
        {"a": torch.zeros(1)},
        str(broken),
        metadata={"format": "musar-branch-lora", "lora_config": json.dumps({"rank": 3})},
    )
    with pytest.raises(MusarError, match="unreadable LoRA config"):
        load_branch_lora(model, broken)

    inject_branch_lora(model, BranchLoRAConfig(noise_rank=1, subject_rank=4))
    with pytest.raises(MusarError, match="was saved with"):
        load_branch_lora(model, save_branch_lora(deeper, tmp_path / "deep2.safetensors"))
