"""Pieces built from library parts (issue 23 item 3) keep the behaviour the package relies on: the
text-embedding cache (functools.lru_cache), the toy report's grid (diffusers' make_image_grid),
the toy pretraining's LR schedule (transformers) and weight average (diffusers' EMAModel)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from musar.toy.pretrain import PretrainConfig, lr_schedule, weight_average
from musar.toy.report import _grid
from musar.train.encoding import TextCache


class _Pipe:
    """What encode_batch's text path calls on a pipeline, counting the encoder calls."""

    def __init__(self) -> None:
        self.vae = SimpleNamespace(device=torch.device("cpu"))
        self.calls: list[tuple[str, str, int]] = []

    def encode_prompt(self, prompt: str, prompt_2: None, device: torch.device, max_sequence_length: int) -> tuple:
        self.calls.append(("prompt", prompt, max_sequence_length))
        return torch.full((1, max_sequence_length, 2), float(len(prompt))), torch.ones(1, 3), None

    def _get_t5_prompt_embeds(self, prompt: str, max_sequence_length: int, device: torch.device) -> torch.Tensor:
        self.calls.append(("phrase", prompt, max_sequence_length))
        return torch.zeros(1, max_sequence_length, 2)


def test_text_cache_is_an_lru_of_its_size_and_zero_turns_it_off() -> None:
    pipe, cache = _Pipe(), TextCache(2)
    first = cache.encode(pipe, "prompt", "a dog", 8)
    assert cache.encode(pipe, "prompt", "a dog", 8) is first and len(pipe.calls) == 1
    assert len(cache.encode(pipe, "phrase", "dog", 4)) == 1 and len(pipe.calls) == 2
    cache.encode(pipe, "prompt", "a dog", 16)  # another length is another entry; evicts the least recent
    cache.encode(pipe, "phrase", "dog", 4)
    assert len(pipe.calls) == 3
    cache.encode(pipe, "prompt", "a dog", 8)  # evicted
    assert len(pipe.calls) == 4 and cache.encode.cache_info().hits == 2

    off = TextCache(0)
    off.encode(pipe, "prompt", "a cat", 8)
    off.encode(pipe, "prompt", "a cat", 8)
    assert len(pipe.calls) == 6 and off.encode.cache_info().currsize == 0


def test_report_grid_has_two_white_pixels_between_and_around_cells_and_pads_short_rows() -> None:
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(4)]
    rows = [tiles[:3], tiles[3:]]
    out = np.asarray(_grid(rows))
    side, gap = 16, 2
    assert out.shape == (2 * (side + gap) + gap, 3 * (side + gap) + gap, 3)
    covered = np.zeros(out.shape[:2], dtype=bool)
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            y0, x0 = gap + y * (side + gap), gap + x * (side + gap)
            expected = np.asarray(img.resize((side, side), Image.NEAREST))
            assert np.array_equal(out[y0 : y0 + side, x0 : x0 + side], expected)
            covered[y0 : y0 + side, x0 : x0 + side] = True
    assert (out[~covered] == 255).all()


def _lrs(cfg: PretrainConfig) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = lr_schedule(opt, cfg)
    out = []
    for _ in range(cfg.steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_pretrain_lr_warms_up_from_zero_then_decays_by_cosine_to_the_floor() -> None:
    cfg = PretrainConfig(steps=10, warmup=4, min_lr_ratio=0.1)
    lrs = _lrs(cfg)
    assert lrs[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75])  # transformers' warmup: step / warmup
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 6)) for s in range(4, 10)]
    assert lrs[4:] == pytest.approx(cosine)
    assert _lrs(PretrainConfig(steps=6, warmup=2, min_lr_ratio=1.0))[2:] == pytest.approx([1.0] * 4)  # the shipped recipe


def test_pretrain_ema_copies_the_weights_during_warmup_then_decays_at_exactly_ema_decay() -> None:
    assert weight_average([], PretrainConfig(ema_decay=0.0)) is None
    g = torch.Generator().manual_seed(0)
    for warmup in (0, 3):
        params = [torch.nn.Parameter(torch.randn(4, generator=g)) for _ in range(2)]
        ema = weight_average(params, PretrainConfig(ema_decay=0.9, warmup=warmup))
        reference = [p.detach().clone() for p in params]
        for step in range(6):
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(4, generator=g))
            d = 0.9 if step >= warmup else 0.0
            reference = [d * r + (1 - d) * p.detach() for r, p in zip(reference, params, strict=True)]
            ema.step(params)
            for r, s in zip(reference, ema.shadow_params, strict=True):
                torch.testing.assert_close(s, r)
