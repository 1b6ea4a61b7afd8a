"""The toy chain shortened to seconds: the learned codec, pretrain -> musar train -> report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from musar.toy.codec import CodecTrainConfig, ToyCodec, codec_round_trip, train_codec
from musar.toy.model import build_toy_pipeline, load_toy_pipeline, vocabulary
from musar.toy.world import PALETTE, make_multi_scenes, render_array


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    scenes = make_multi_scenes(n, seed=seed)
    return torch.from_numpy(np.stack([render_array(s) for s in scenes])).float().permute(0, 3, 1, 2) / 127.5 - 1


def test_codec_shapes_and_palette_decoding() -> None:
    codec = build_toy_pipeline().vae
    pixels = _pixels(4)
    latents = codec.encode(pixels).latent_dist.mode()
    assert latents.shape == (4, 16, 16, 16)
    assert torch.equal(codec.encode(pixels).latent_dist.sample(torch.Generator()), latents)
    decoded = codec.decode(latents, return_dict=False)[0]
    assert decoded.shape == pixels.shape
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 127.5 - 1
    # Every decoded pixel is exactly one palette colour, even from an untrained decoder.
    per_pixel = decoded.permute(0, 2, 3, 1).reshape(-1, 1, 3)
    assert (per_pixel == palette[None]).all(-1).any(-1).all()
    # Rendered pixels are their own nearest palette colour.
    assert torch.equal(palette[codec.labels(pixels)].permute(0, 3, 1, 2), pixels)


def test_codec_training_learns_the_world_and_standardises_latents() -> None:
    codec = build_toy_pipeline().vae
    pixels, held_out = _pixels(96), _pixels(16, seed=5)
    before = (codec(held_out) == held_out).all(1).float().mean()
    info = train_codec(codec, pixels, CodecTrainConfig(steps=150, batch_size=16, lr=3e-3), log=lambda _: None)
    after = (codec(held_out) == held_out).all(1).float().mean()
    assert after > 0.9 and after > before + 0.2, (before, after)
    assert info["pixel_accuracy"] > 0.9
    image = Image.fromarray(render_array(make_multi_scenes(1, seed=9)[0]))
    assert (np.asarray(codec_round_trip(codec, image)) == np.asarray(image)).all(-1).mean() > 0.9
    z = (codec.encode(pixels).latent_dist.mode() - codec.config.shift_factor) * codec.config.scaling_factor
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3
    assert not any(p.requires_grad for p in codec.parameters())


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
    for mine, theirs in ((pipe.transformer, back.transformer), (pipe.vae, back.vae)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pixels = _pixels(2)
    assert torch.equal(back.vae(pixels), pipe.vae(pixels))
    assert torch.equal(back.vae.colours, pipe.vae.colours)


def test_diptych_pool_follows_the_template_and_another_rule() -> None:
    from musar.data.samples import DIPTYCH_TEMPLATE
    from musar.toy.pools import diptych_pool
    from musar.utils.spans import find_phrase_chars

    tok = build_toy_pipeline().tokenizer_2
    pool = diptych_pool(40, seed=0, tokenizer=tok, max_length=64, brief_prob=1.0, same_identity_prob=0.0)
    assert pool.pixels.shape == (40, 3, 64, 128) and len(pool.prompts) == 40
    head = DIPTYCH_TEMPLATE.split("{")[0]
    assert all(p.startswith(head) for p in pool.prompts)
    repeats = [p for p in pool.prompts if "another" in p]
    assert repeats  # same-shape halves occur, and are marked the way make_diptych marks them
    for prompt in repeats:
        left = prompt[len(head):].split(".")[0]
        assert find_phrase_chars(prompt, [left, f"another {left}"])


def test_pretrain_config_loads_the_shipped_recipe_and_refuses_typos() -> None:
    import pytest

    from musar.errors import MusarError
    from musar.toy.pretrain import PretrainConfig, load_pretrain_config

    cfg = load_pretrain_config("configs/toy_base.yaml", ["steps=7", "codec.steps=3"])
    assert isinstance(cfg, PretrainConfig) and cfg.steps == 7 and cfg.codec.steps == 3
    with pytest.raises(MusarError, match="stepz"):
        load_pretrain_config(None, ["stepz=1"])


def test_shortened_end_to_end(tmp_path: Path) -> None:
    from musar.toy.chain import run_chain
    from musar.toy.pretrain import PretrainConfig, pretrain
    from musar.toy.variants import VARIANTS

    out = tmp_path / "toy"
    tiny = ["steps=4", "batch_size=2", "scenes=16", "diptychs=8", "log_every=1", "codec.steps=2", "codec.batch_size=2",
            "codec.log_every=1", "text_mlm_steps=3", "grounding_weight=0.2", "ema_decay=0.9", "warmup=1"]
    short = ("curriculum.stage1_steps=2", "curriculum.stage2_steps=1", "curriculum.stage3_steps=1",
             "optim.batch_size=2", "optim.warmup_steps=1", "log_every=1")
    walls = run_chain(out, "configs/toy_base.yaml", "configs/toy_musar.yaml", threads=1, base_overrides=tuple(tiny),
                      train_overrides=short, report_args={"cases": 2, "seeds": (0,), "gate_cases": (2, 2)})
    assert {"pretrain", "data", "train", "report"} <= set(walls)
    log = (out / "chain.log").read_text()
    assert all(f"train:{name}: finished" in log for name in VARIANTS)  # every variant, in its own process
    info = json.loads((out / "pretrain.json").read_text())
    # the T5 masked-word stage ran and scored itself; the grounding term (a cross-entropy) was on
    assert info["text"]["loss"] > 0 and 0 <= info["text"]["masked_accuracy"] <= 1
    assert info["loss_history"][-1]["grounding"] > 0
    again, info2 = pretrain(replace(PretrainConfig(steps=1, batch_size=2, scenes=8, diptychs=4, log_every=1),
                                    codec_from=str(out / "base")), tmp_path / "again", log=lambda _: None)
    assert info2["codec"] == {"reused": str(out / "base")}
    first = load_toy_pipeline(out / "base")
    assert all(torch.equal(a, b) for a, b in zip(first.vae.state_dict().values(), again.vae.state_dict().values(), strict=True))
    table = (out / "report" / "report.md").read_text()
    assert "MUSAR (full)" in table and "routes given from the true layout" in table and "| 0: `single.shape`" in table
    saved = json.loads((out / "report" / "report.json").read_text())
    assert 0 <= saved["full"]["rates"]["routing_all"][0] <= 1 and saved["single_stage1"]["subjects"] == 1
    assert saved["three"]["subjects"] == 3 and saved["four"]["subjects"] == 4
    assert saved["full"]["members"] == ["full", "full_seed1", "full_seed2"] and len(saved["four"]["seed_rates"]) == 3
    assert saved["four_no_dynamic"]["subjects"] == 4 and "seed_rates" in saved["four_no_dynamic"]
    assert "| 4: `four.pattern`" in table and "four > four_no_dynamic" in table
    assert json.loads((out / "musar" / "full_seed1" / "wall.json").read_text())["overrides"].count("seed=1") == 1
    assert saved["given_routes"]["rates"]["routing_all"][0] == 1.0  # boxes from the true layout route every token right
    assert json.loads((out / "musar" / "full" / "wall.json").read_text())["steps"] == 4
    from musar.train.checkpoint import list_checkpoints

    # Resume checkpoints go once a LoRA exists; full keeps the end of stage 1 (the single_stage1 row).
    assert [s for s, _ in list_checkpoints(out / "musar" / "full")] == [2]
    assert list_checkpoints(out / "musar" / "no_dynamic") == []
    # A report of rows without two subjects has no two-subject grid (it once failed looking for one).
    from musar.toy.report import run_report

    three = run_report(out, rows=["three"], cases=2, seeds=(0,), report_dir=tmp_path / "three", base_gates=False,
                       log=lambda _: None)
    assert set(three) == {"three"} and not (tmp_path / "three" / "grid.png").exists()
    # A second call finds every stage done and redoes none of them.
    assert run_chain(out, "configs/toy_base.yaml", "configs/toy_musar.yaml") == walls
    assert "done before, skipped" in (out / "chain.log").read_text()
