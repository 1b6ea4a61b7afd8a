"""The toy chain shortened to seconds: codec exactness, pretrain -> musar train -> report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from musar.toy.codec import ToyCodec
from musar.toy.model import build_toy_pipeline, load_toy_pipeline, vocabulary
from musar.toy.world import make_multi_scenes, render_array


def test_codec_round_trip_is_exact() -> None:
    codec = ToyCodec()
    scenes = make_multi_scenes(4, seed=0)
    pixels = torch.from_numpy(np.stack([render_array(s) for s in scenes])).float().permute(0, 3, 1, 2) / 127.5 - 1
    latents = codec.encode(pixels).latent_dist.mode()
    assert latents.shape == (4, 48, 16, 16)
    assert torch.equal(codec.encode(pixels).latent_dist.sample(torch.Generator()), latents)
    assert torch.equal(codec.decode(latents, return_dict=False)[0], pixels)


def test_vocabulary_covers_captions_and_diptych_template() -> None:
    pipe = build_toy_pipeline()
    unk = pipe.tokenizer_2.unk_token_id
    words = " ".join(__import__("musar.toy.world", fromlist=["caption"]).caption(s) for s in make_multi_scenes(50, 3))
    words += " Two images concatenated side by side, the left part is: another red star. x, the right part is:"
    assert unk not in pipe.tokenizer_2(words).input_ids
    assert "another" in vocabulary()


def test_toy_folder_saves_and_loads(tmp_path: Path) -> None:
    pipe = build_toy_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    back = load_toy_pipeline(tmp_path / "base")
    assert isinstance(back.vae, ToyCodec) and back.vae_scale_factor == 4
    a, b = pipe.transformer.state_dict(), back.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shortened_end_to_end(tmp_path: Path) -> None:
    from musar.toy.pretrain import PretrainConfig, pretrain
    from musar.toy.report import run_report
    from musar.toy.variants import train_variant
    from musar.toy.world import write_pairs_parquet

    out = tmp_path / "toy"
    pretrain(PretrainConfig(steps=2, batch_size=2, scenes=16, log_every=1), out, log=lambda _: None)
    write_pairs_parquet(16, out / "pairs.parquet", seed=1, size=64)
    short = ("curriculum.stage1_steps=1", "curriculum.stage2_steps=1", "curriculum.stage3_steps=1",
             "optim.batch_size=2", "optim.warmup_steps=1", "log_every=1")
    for name in ("full", "no_debias"):
        assert train_variant(name, out, extra=short, log=lambda _: None).is_file()
    results = run_report(out, ["full", "no_debias"], cases=2, seeds=(0,), log=lambda _: None)
    assert set(results) == {"base", "full", "no_debias"}
    table = (out / "report" / "report.md").read_text()
    assert "`full`" in table and "`no_debias`" in table and (out / "report" / "grid.png").is_file()
    saved = json.loads((out / "report" / "report.json").read_text())
    assert saved["full"]["scores"]["all"]["images"] == 2.0
    assert json.loads((out / "musar" / "full" / "wall.json").read_text())["steps"] == 3
