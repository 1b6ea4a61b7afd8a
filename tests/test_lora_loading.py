"""diffusers' LoRA API on MusarPipeline: MUSAR files, a standard peft/diffusers FLUX LoRA stacked
on top (every token or chosen token kinds), weights, fuse, delete and unload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from musar.errors import MusarError
from musar.lora import BranchLoRAConfig, BranchLoRALinear, inject_branch_lora, lora_named_parameters
from musar.lora.io import save_branch_lora
from musar.models.transformer import MusarTransformer
from musar.pipelines.pipeline_musar import MusarPipeline
from musar.pipelines.presets import tiny_pipeline

from helpers import make_inputs

# What community FLUX LoRAs adapt: attention, MLPs, embedders, the output projection and AdaLN.
STYLE_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    "x_embedder", "context_embedder", "norm1.linear",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A MUSAR LoRA file and a standard FLUX LoRA written as FluxPipeline.save_lora_weights writes it."""
    tmp = tmp_path_factory.mktemp("loras")
    torch.manual_seed(1)
    musar = tiny_pipeline().transformer
    inject_branch_lora(musar, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    for _, p in lora_named_parameters(musar):
        nn.init.normal_(p, std=0.2)
    style = tiny_pipeline().transformer
    style.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=STYLE_TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, p in style.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    MusarPipeline.save_lora_weights(tmp / "style", transformer_lora_layers=get_peft_model_state_dict(style))
    return {"musar": save_branch_lora(musar, tmp / "musar.safetensors"), "style": tmp / "style"}


def _forward(pipe: MusarPipeline, capture: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The transformer's output for fixed inputs with 2 conditions, and the outputs of ``capture``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        pipe.transformer.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
        for name in capture
    ]
    try:
        with torch.no_grad():
            out = pipe.transformer(**make_inputs(pipe.transformer, num_conditions=2, prompt_len=8)).sample
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def _plain(model: nn.Module) -> bool:
    return not any(isinstance(m, (BranchLoRALinear, BaseTunerLayer)) for m in model.modules())


def test_musar_file_through_load_lora_weights_equals_load_lora(files: dict[str, Path], tmp_path: Path) -> None:
    a, b = tiny_pipeline(), tiny_pipeline()
    a.load_lora(files["musar"])
    b.load_lora_weights(files["musar"])
    pa, pb = dict(lora_named_parameters(a.transformer)), dict(lora_named_parameters(b.transformer))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(_forward(a)[0], _forward(b)[0])
    assert b.get_list_adapters() == {"transformer": ["musar"]}
    # save_lora_weights on the instance writes the file load_lora_weights(folder) finds.
    b.save_lora_weights(tmp_path / "saved")
    c = tiny_pipeline()
    c.load_lora_weights(tmp_path / "saved")
    assert torch.equal(_forward(c)[0], _forward(a)[0])
    with pytest.raises(MusarError, match="token_kinds is for standard LoRAs"):
        tiny_pipeline().load_lora_weights(files["musar"], token_kinds=("noise",))
    with pytest.raises(MusarError, match="loads from its safetensors file"):
        tiny_pipeline().load_lora_weights(dict(lora_named_parameters(a.transformer)))


def test_standard_lora_on_every_token_changes_prompt_rows_and_nothing_at_weight_0(files: dict[str, Path]) -> None:
    # The embedders see the raw inputs, so their rows compare across configurations exactly.
    layers = ("context_embedder", "x_embedder")  # text stream: [PROMPT | CT...]; image: [NOISE | CI...]
    pipe = tiny_pipeline()
    pipe.load_lora_weights(files["musar"])
    musar_out, musar_rows = _forward(pipe, layers)
    pipe.load_lora_weights(files["style"], adapter_name="style")
    assert pipe.get_list_adapters() == {"transformer": ["style", "musar"]}
    both_out, both_rows = _forward(pipe, layers)
    prompt, noise = slice(0, 8), slice(0, 16)
    assert not torch.equal(both_rows["context_embedder"][:, prompt], musar_rows["context_embedder"][:, prompt])
    assert not torch.equal(both_rows["x_embedder"][:, noise], musar_rows["x_embedder"][:, noise])
    assert not torch.equal(both_out, musar_out)
    pipe.set_adapters(["style"], [0.0])  # weight 0: exactly the MUSAR LoRA alone
    assert torch.equal(_forward(pipe)[0], musar_out)
    pipe.set_adapters(["style", "musar"], [1.0, 1.0])
    assert torch.equal(_forward(pipe)[0], both_out)
    pipe.set_adapters(["style", "musar"], [1.0, 0.0])  # the MUSAR LoRA's own weight
    style_alone = tiny_pipeline()
    style_alone.load_lora_weights(files["style"], adapter_name="style")
    assert torch.allclose(_forward(pipe)[0], _forward(style_alone)[0], atol=1e-6)


def test_token_kinds_restrict_the_standard_lora_to_their_rows(files: dict[str, Path]) -> None:
    layers = ("context_embedder", "x_embedder", "proj_out")
    base = tiny_pipeline()
    base.load_lora_weights(files["musar"])
    _, ref = _forward(base, layers)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(files["musar"])
    pipe.load_lora_weights(files["style"], adapter_name="style", token_kinds=("noise",))
    out, rows = _forward(pipe, layers)
    text, image = rows["context_embedder"], rows["x_embedder"]
    assert torch.equal(text, ref["context_embedder"])  # PROMPT and CT rows: untouched
    assert torch.equal(image[:, 16:], ref["x_embedder"][:, 16:])  # CI rows: untouched
    assert not torch.equal(image[:, :16], ref["x_embedder"][:, :16])  # NOISE rows: adapted
    # Loaded in the other order, the LoRAs nest the same way and compute the same thing.
    other = tiny_pipeline()
    other.load_lora_weights(files["style"], adapter_name="style", token_kinds=("noise",))
    other.load_lora_weights(files["musar"])
    assert torch.equal(_forward(other)[0], out)
    with pytest.raises(MusarError, match="unknown token kind"):
        pipe.load_lora_weights(files["style"], adapter_name="x", token_kinds=("pixels",))
    with pytest.raises(MusarError, match="cannot fuse 'style'"):
        pipe.fuse_lora(adapter_names=["style"])


def test_restricted_lora_without_musar_leaves_other_rows_exact(files: dict[str, Path]) -> None:
    layers = ("context_embedder",)
    base_out, ref = _forward(tiny_pipeline(), layers)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(files["style"], adapter_name="style", token_kinds=["condition"])
    _, rows = _forward(pipe, layers)
    assert torch.equal(rows["context_embedder"][:, :8], ref["context_embedder"][:, :8])
    assert not torch.equal(rows["context_embedder"][:, 8:], ref["context_embedder"][:, 8:])
    pipe.delete_adapters("style")  # diffusers keeps peft's emptied layers; the hosts go
    assert not any(isinstance(m, BranchLoRALinear) for m in pipe.transformer.modules())
    assert torch.equal(_forward(pipe)[0], base_out)


def test_unload_restores_the_base_exactly(files: dict[str, Path]) -> None:
    pipe = tiny_pipeline()
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    base_out = _forward(pipe)[0]
    pipe.load_lora_weights(files["style"], adapter_name="style")
    pipe.load_lora_weights(files["musar"])
    pipe.load_lora_weights(files["style"], adapter_name="noise_only", token_kinds=("noise",))
    assert not torch.equal(_forward(pipe)[0], base_out)
    pipe.unload_lora_weights()
    assert _plain(pipe.transformer) and pipe.lora_path is None
    after = pipe.transformer.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(_forward(pipe)[0], base_out)
    assert pipe.get_list_adapters() == {}


def test_fuse_is_exact_for_an_every_token_lora_and_refused_for_musar(files: dict[str, Path]) -> None:
    pipe = tiny_pipeline()
    pipe.load_lora_weights(files["musar"])
    pipe.load_lora_weights(files["style"], adapter_name="style")
    unfused = _forward(pipe)[0]
    with pytest.raises(MusarError, match="cannot fuse 'musar'"):
        pipe.fuse_lora(adapter_names=["musar"])
    pipe.fuse_lora()  # default: every active LoRA that adapts every token, i.e. "style"
    assert pipe.fused_loras == {"style"}
    assert torch.allclose(_forward(pipe)[0], unfused, atol=1e-5)
    pipe.unfuse_lora()
    assert torch.allclose(_forward(pipe)[0], unfused, atol=1e-5)


def test_disable_and_delete_reach_the_musar_lora(files: dict[str, Path]) -> None:
    base_out = _forward(tiny_pipeline())[0]
    pipe = tiny_pipeline()
    pipe.load_lora_weights(files["musar"], adapter_name="subjects")
    pipe.load_lora_weights(files["style"], adapter_name="style")
    stacked = _forward(pipe)[0]
    assert pipe.get_active_adapters() == ["style", "subjects"]
    pipe.disable_lora()
    assert torch.equal(_forward(pipe)[0], base_out)
    pipe.enable_lora()
    assert torch.equal(_forward(pipe)[0], stacked)
    pipe.delete_adapters(["subjects", "style"])
    assert not any(isinstance(m, BranchLoRALinear) for m in pipe.transformer.modules())
    assert pipe.transformer.lora_config is None
    assert torch.equal(_forward(pipe)[0], base_out)
    with pytest.raises(ValueError, match="not in the list"):
        pipe.set_adapters(["subjects"])


def test_branch_lora_finds_linears_inside_peft_layers(tiny_flux_config: dict) -> None:
    # Training and load_lora inject into whatever sits at a target path: a peft layer is hosted.
    model = MusarTransformer(**tiny_flux_config)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    host = model.transformer_blocks[0].attn.to_q
    assert isinstance(host, BranchLoRALinear) and isinstance(host.base_layer, BaseTunerLayer)
    assert all(".base_layer." not in n for n, _ in lora_named_parameters(model))


def test_stacking_standard_loras_is_quiet_but_real_warnings_still_show(files: dict[str, Path]) -> None:
    import logging
    import warnings

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("diffusers.loaders.lora_base", "diffusers.loaders.peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        pipe = tiny_pipeline()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(files["musar"])
            pipe.load_lora_weights(files["style"], adapter_name="a")
            pipe.load_lora_weights(files["style"], adapter_name="b")  # a second adapter: peft would warn
            warnings.warn("Already found a `peft_config` attribute in the model", UserWarning, stacklevel=1)  # the user's own
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert set(pipe.transformer.peft_config) >= {"a", "b"}
    assert not [m for m in seen if m.startswith("No LoRA keys associated to CLIPTextModel")], seen
    # only the warning raised outside the loading call came through
    assert [str(w.message) for w in caught if "peft_config" in str(w.message)] == [
        "Already found a `peft_config` attribute in the model"]
