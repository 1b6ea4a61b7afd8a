"""The checks that need the model run before it loads (issue 22): eval's cases through the model's
tokenizer, a LoRA or GGUF file against the model's config, the memory estimate, boxes in the
model's own token size.

Every CLI row points at a copy of the toy model whose transformer weights are cut in half
(``broken``): loading it fails (``test_the_broken_model_does_not_load``), so a row that ends on its
own message proves its check ran before the load. Each row: exit 2, exactly one stderr line with
the row's text, no traceback, nothing created or changed.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from musar.cli import main
from musar.errors import MusarError
from musar.lora import BranchLoRAConfig, inject_branch_lora
from musar.lora.fit import flux_linears, lora_misfit
from musar.lora.io import save_branch_lora
from musar.models.transformer import MusarTransformer
from musar.pipelines.preload import FLUX1_DEV, model_facts
from musar.toy.model import SHIPPED_BASE

from conftest import TINY_FLUX_CONFIG

PROMPT = "a red circle and a blue square"
GiB = 1024**3


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else f"{p.lstat().st_size} {p.lstat().st_mtime_ns}"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The broken toy model, a reference image, LoRA and GGUF files made for other models."""
    from musar.pipelines.gguf import write_gguf
    from musar.pipelines.presets import tiny_pipeline

    d = tmp_path_factory.mktemp("kit")
    shutil.copytree(SHIPPED_BASE, d / "broken")
    weights = d / "broken" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(d / "broken", d / "badtok")
    (d / "badtok" / "tokenizer_2" / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "dog.png")
    tiny = tiny_pipeline().transformer
    inject_branch_lora(tiny, BranchLoRAConfig(noise_rank=2, subject_rank=4))
    save_branch_lora(tiny, d / "tiny_lora.safetensors")
    write_gguf(tiny_pipeline().transformer.state_dict(), d / "tiny.gguf")
    good = (d / "tiny.gguf").read_bytes()
    (d / "cut.gguf").write_bytes(good[: len(good) - 100])
    (d / "v1.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    (d / "count.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0))
    (d / "string.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62) + b"x" * 16)
    return {"dir": d, "broken": d / "broken", "badtok": d / "badtok", "dog": d / "dog.png", "tiny_lora": d / "tiny_lora.safetensors",
            **{k: d / f"{k}.gguf" for k in ("tiny", "cut", "v1", "count", "string")}}


def _gen(kit: dict[str, Path], w: Path, *extra: str, phrase: str = "a blue square") -> list[str]:
    return ["generate", "--prompt", PROMPT, "--subject", str(kit["dog"]), phrase, "--model", str(kit["broken"]),
            "--height", "64", "--width", "64", "--steps", "1", "--out", str(w / "out" / "o.png"), *extra]


def _cases(kit: dict[str, Path], w: Path, cases: list[dict], *extra: str) -> list[str]:
    (w / "cases.json").write_text(json.dumps(cases))
    return ["eval", "--protocol", "custom", "--data", str(w / "cases.json"), "--model", str(kit["broken"]),
            "--height", "64", "--width", "64", "--steps", "1", "--skip-metrics", "--out", str(w / "run"), *extra]


def _case(kit: dict[str, Path], prompt: str, *phrases: str, image: Path | None = None) -> dict:
    return {"prompt": prompt, "subjects": [{"image": str(image or kit["dog"]), "phrase": p} for p in phrases]}


def _truncated_image(kit: dict[str, Path], w: Path) -> Path:
    good = kit["dog"].read_bytes()
    (w / "cut.png").write_bytes(good[: len(good) // 2])
    return w / "cut.png"


def _train(kit: dict[str, Path], w: Path, *sets: str) -> list[str]:
    (w / "c.yaml").write_text(f"max_steps: 1\noutput_dir: {w / 'run'}\nmodel:\n  pretrained: {kit['broken']}\n")
    return ["train", "--config", str(w / "c.yaml"), *[a for s in sets for a in ("--set", s)]]


LONG = " ".join(["red"] * 600)
# (row id, argv builder given the kit and the row's folder, text of the one error line, free bytes or None)
ROWS: list[tuple[str, Callable[[dict[str, Path], Path], list[str]], str, int | None]] = [
    ("generate-phrase-truncated", lambda k, w: _gen(k, w, "--max-sequence-length", "4"),
     "'a blue square' falls beyond the first 4 prompt tokens", None),
    ("generate-tokenizer-damaged", lambda k, w: [*_gen(k, w), "--model", str(k["badtok"])],
     "cannot load the T5 tokenizer (tokenizer_2) of model folder", None),
    ("generate-lora-other-model", lambda k, w: _gen(k, w, "--lora", str(k["tiny_lora"])),
     "does not match the model (model folder", None),
    ("generate-gguf-other-model", lambda k, w: _gen(k, w, "--quantize", f"gguf:{k['tiny']}"),
     "it holds a transformer 32 wide, the model is 192 wide", None),
    ("generate-gguf-truncated", lambda k, w: _gen(k, w, "--quantize", f"gguf:{k['cut']}"), "is truncated", None),
    ("generate-gguf-version", lambda k, w: _gen(k, w, "--quantize", f"gguf:{k['v1']}"), "is GGUF version 1", None),
    ("generate-gguf-tensor-count", lambda k, w: _gen(k, w, "--quantize", f"gguf:{k['count']}"),
     "declares 1,099,511,627,776 tensors", None),
    ("generate-gguf-huge-string", lambda k, w: _gen(k, w, "--quantize", f"gguf:{k['string']}"), "a string of", None),
    ("generate-memory", lambda k, w: _gen(k, w, "--height", "4096", "--width", "4096"),
     "GiB free; lower --height/--width", 64 * 1024 * 1024),
    ("eval-phrase-truncated", lambda k, w: _cases(k, w, [_case(k, PROMPT, "a red circle"), _case(k, LONG + " a blue square", "a blue square")]),
     "case custom001: subject phrase 'a blue square' falls beyond the first 512 prompt tokens", None),
    ("eval-subword-phrase", lambda k, w: _cases(k, w, [_case(k, "a redder circle", "red")]),
     "'red' does not appear in the prompt 'a redder circle' as whole words", None),
    ("eval-overlapping-phrases", lambda k, w: _cases(k, w, [_case(k, "a red circle", "a red circle", "red circle")]),
     "overlaps another subject phrase", None),
    ("eval-truncated-image", lambda k, w: _cases(k, w, [_case(k, PROMPT, "a red circle", image=_truncated_image(k, w))]),
     "cannot decode image", None),
    ("eval-lora-other-model", lambda k, w: _cases(k, w, [_case(k, PROMPT, "a red circle")], "--lora", str(k["tiny_lora"])),
     "does not match the model", None),
    ("eval-single-lora-dual", lambda k, w: _cases(k, w, [_case(k, PROMPT, "a red circle")], "--lora",
                                                  str(SHIPPED_BASE.parent / "musar_lora.safetensors"), "--ablation", "single-lora"),
     "needs a LoRA trained with mode 'shared'", None),
    ("eval-memory", lambda k, w: _cases(k, w, [_case(k, PROMPT, "a red circle")], "--height", "4096", "--width", "4096"),
     "needs ~", 64 * 1024 * 1024),
    ("train-memory", lambda k, w: _train(k, w, "optim.batch_size=1024", "data.view_size=4096"),
     "training with optim.batch_size 1024 at data.view_size 4096 needs ~", 64 * GiB),
]


@pytest.mark.parametrize(("argv", "needle", "free"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_model_checks_refuse_before_the_model_loads(
    kit: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    argv: Callable[[dict[str, Path], Path], list[str]], needle: str, free: int | None,
) -> None:
    if free is not None:  # the machine, as a run on CPU sees it
        monkeypatch.setattr("musar.utils.memory.free_bytes", lambda device: free)
    monkeypatch.setattr("musar.cli.preflight.default_device", lambda: "cpu")
    args = argv(kit, tmp_path)
    before = snapshot(tmp_path), snapshot(kit["dir"])
    rc = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"musar {args[0]}: error:") and needle in lines[0], lines[0]
    assert (snapshot(tmp_path), snapshot(kit["dir"])) == before, "a refused command created or changed something"


def test_the_broken_model_does_not_load(kit: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The control of every row above: with inputs that pass, the same folder fails at its weights.
    assert main(_gen(kit, tmp_path)) != 0
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.safetensors" in err and not (tmp_path / "out" / "o.png").exists(), err


# -- what the checks read from a model ------------------------------------------------------------

@pytest.mark.parametrize("config", [
    TINY_FLUX_CONFIG, {**TINY_FLUX_CONFIG, "guidance_embeds": False, "out_channels": 8, "num_single_layers": 0},
    {k: v for k, v in json.loads((SHIPPED_BASE / "transformer" / "config.json").read_text()).items() if not k.startswith("_")},
], ids=["tiny", "no-guidance", "toy"])
def test_the_linear_table_is_the_built_model(config: dict) -> None:
    with torch.device("meta"):
        model = MusarTransformer(**config)
    built = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert flux_linears(config) == built


def test_flux1_dev_defaults_are_the_pipeline_default() -> None:
    from musar.pipelines import preload
    from musar.pipelines.model_folder import flux_transformer_params
    from musar.pipelines.pipeline_musar import DEFAULT_MODEL

    assert preload.DEFAULT_MODEL == DEFAULT_MODEL
    assert 11.8e9 < flux_transformer_params(FLUX1_DEV["transformer"]) < 12.0e9  # FLUX.1-dev: 11.9e9


def test_token_size_comes_from_the_model() -> None:
    assert model_facts(preset="toy").token_px == 8  # VAE factor 4 x the 2x2 packing
    assert model_facts(SHIPPED_BASE).token_px == 8
    assert model_facts(preset="tiny").token_px == 16
    assert model_facts().token_px == 16  # FLUX.1-dev, known before any download


def test_the_argument_checks_token_size_is_the_real_one() -> None:
    from musar.pipelines.preload import declared_token_px
    from musar.utils.registry import BUILTIN_PRESETS, preset_names

    for name in preset_names():  # the core's presets are taken as FLUX-shaped without a build: they are
        assert declared_token_px(preset=name) == model_facts(preset=name).token_px, name
    assert set(BUILTIN_PRESETS) <= set(preset_names())
    assert declared_token_px(SHIPPED_BASE) == 8


def test_boxes_are_checked_in_the_models_tokens(kit: dict[str, Path], tmp_path: Path) -> None:
    from musar.cli import build_parser
    from musar.cli.args import validate

    def check(box: str, preset: str) -> None:
        validate(build_parser(["generate"]).parse_args(
            ["generate", "--prompt", PROMPT, "--subject", str(kit["dog"]), "a red circle", "--preset", preset,
             "--height", "64", "--width", "64", "--box", *box.split(), "--out", str(tmp_path / "o.png")]))

    check("0 0 0.15 0.15", "toy")  # 9.6 px: more than one of the toy model's 8 px tokens
    with pytest.raises(MusarError, match="smaller than one 8x8 px token"):
        check("0 0 0.1 0.1", "toy")
    with pytest.raises(MusarError, match="smaller than one 16x16 px token"):
        check("0 0 0.15 0.15", "tiny")  # FLUX's 16 px tokens


# -- LoRA files against a model config -------------------------------------------------------------

def _lora_shapes(config: dict, lora: BranchLoRAConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MusarTransformer(**config)
    inject_branch_lora(model, lora)
    return {n: tuple(p.shape) for n, p in model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize(("other", "says"), [
    ({"attention_head_dim": 8, "axes_dims_rope": (2, 2, 4)}, "made for a transformer 16 wide, the model is 32 wide"),
    ({"num_layers": 3}, "it has weights for 3 double blocks (transformer_blocks.*), the model has 2 (num_layers = 2)"),
    ({"num_single_layers": 1}, "it has weights for 1 single blocks (single_transformer_blocks.*), the model has 2"),
    ({"in_channels": 8}, "x_embedder.lora_A.noise.weight has shape (2, 8), the model expects (2, 16)"),
])
def test_a_lora_of_another_model_is_named_for_what_differs(other: dict, says: str) -> None:
    from musar.lora.fit import expected_lora_shapes

    lora = BranchLoRAConfig(noise_rank=2, subject_rank=4)
    shapes = _lora_shapes({**TINY_FLUX_CONFIG, **other}, lora)
    expected = expected_lora_shapes(lora, flux_linears(TINY_FLUX_CONFIG))
    assert expected == _lora_shapes(TINY_FLUX_CONFIG, lora)  # the table is what injection makes
    assert lora_misfit(expected, expected, TINY_FLUX_CONFIG) is None
    assert says in (lora_misfit(shapes, expected, TINY_FLUX_CONFIG) or "")


def test_lora_targets_that_match_nothing_are_refused(tmp_path: Path) -> None:
    from musar.lora.fit import check_lora_fits

    model = MusarTransformer(**TINY_FLUX_CONFIG)
    inject_branch_lora(model, BranchLoRAConfig(noise_rank=2, subject_rank=2, targets=("single_transformer_blocks.1.*",)))
    path = save_branch_lora(model, tmp_path / "l.safetensors")
    check_lora_fits(path, TINY_FLUX_CONFIG, "tiny")
    with pytest.raises(MusarError, match=r"does not match the model \(one block\): its target patterns"):
        check_lora_fits(path, {**TINY_FLUX_CONFIG, "num_single_layers": 1}, "one block")


# -- GGUF headers ----------------------------------------------------------------------------------

def test_a_gguf_header_is_read_as_gguf_py_reads_it(kit: dict[str, Path]) -> None:
    import gguf

    from musar.pipelines.gguf import read_gguf_header

    header = read_gguf_header(kit["tiny"])
    reader = gguf.GGUFReader(kit["tiny"])
    assert header.version == 3 and len(header.tensors) == len(reader.tensors)
    for t in reader.tensors:
        assert header.tensors[t.name].nbytes == t.n_bytes
        assert header.tensors[t.name].shape == tuple(int(d) for d in reversed(t.shape))


def test_gguf_fits_counts_blocks_in_either_naming(kit: dict[str, Path]) -> None:
    from musar.pipelines.gguf import GGUFHeader, GGUFTensor, check_gguf_fits, read_gguf_header
    from musar.pipelines.presets import tiny_pipeline

    config = dict(tiny_pipeline().transformer.config)
    check_gguf_fits(read_gguf_header(kit["tiny"]), config, kit["tiny"], "tiny")
    bfl = GGUFHeader(3, {"img_in.weight": GGUFTensor((32, 16), 0, 0), "double_blocks.4.img_mod.lin.weight":
                         GGUFTensor((192, 32), 0, 0)}, 0, 0)
    with pytest.raises(MusarError, match="it has 5 double blocks, the model has 1"):
        check_gguf_fits(bfl, config, "x.gguf", "tiny")


def test_a_gguf_fifo_never_blocks(tmp_path: Path) -> None:
    import os

    from musar.pipelines.gguf import read_gguf_header

    os.mkfifo(tmp_path / "p.gguf")
    with pytest.raises(MusarError, match="not a regular file"):
        read_gguf_header(tmp_path / "p.gguf")
