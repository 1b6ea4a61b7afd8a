"""The LR schedule ``musar train`` builds (transformers' schedules behind ``optim.schedule``): the
warmup ramp, each shape after it, and a scheduler restored from a checkpoint's JSON continuing
exactly where the uninterrupted one goes."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from musar.errors import MusarError
from musar.train import checkpoint as ckpt
from musar.train.config import OptimConfig, load_config
from musar.train.setup import build_scheduler


def _optimizer(optim: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=optim.lr)


def _lrs(optim: OptimConfig, total_steps: int, updates: int | None = None) -> list[float]:
    """The lr each update runs at (as the loop reads it), then the lr left after the last one."""
    opt = _optimizer(optim)
    sched = build_scheduler(opt, optim, total_steps)
    out = []
    for _ in range(total_steps if updates is None else updates):
        out.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr()[0] == out[-1]
        opt.step()
        sched.step()
    return [*out, opt.param_groups[0]["lr"]]


def test_warmup_ramps_from_zero_by_u_over_warmup_then_holds_lr() -> None:
    lrs = _lrs(OptimConfig(lr=2.0, warmup_steps=4, schedule="constant"), total_steps=8)
    # transformers' convention: after u updates lr * u / warmup, so the first update runs at lr 0
    assert lrs[:4] == [0.0, 0.5, 1.0, 1.5]
    assert lrs[4:] == [2.0] * 5
    assert _lrs(OptimConfig(lr=2.0, warmup_steps=0), total_steps=3) == [2.0] * 4  # no warmup: lr from the start


def test_cosine_decays_from_lr_to_lr_times_min_lr_ratio_at_the_last_update() -> None:
    lrs = _lrs(OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), total_steps=14)
    assert lrs[:4] == [0.0, 0.25, 0.5, 0.75]
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (u - 4) / 10)) for u in range(4, 15)]
    assert lrs[4:] == pytest.approx(expected)
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))


def test_linear_decays_in_equal_steps_to_lr_times_min_lr_ratio() -> None:
    lrs = _lrs(OptimConfig(lr=1.0, warmup_steps=2, schedule="linear", min_lr_ratio=0.2), total_steps=12)
    assert lrs[:2] == [0.0, 0.5]
    assert lrs[2:] == pytest.approx([1.0 - 0.08 * k for k in range(11)])
    assert lrs[-1] == pytest.approx(0.2)
    # a linear decay to lr itself is the constant schedule (transformers' polynomial decay refuses it)
    assert _lrs(OptimConfig(lr=1.0, warmup_steps=2, schedule="linear", min_lr_ratio=1.0), 5)[2:] == [1.0] * 4


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_a_warmup_as_long_as_the_run_builds_and_ends_at_lr(schedule: str) -> None:
    lrs = _lrs(OptimConfig(lr=1.0, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1), total_steps=4)
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_a_scheduler_restored_from_its_checkpoint_json_continues_identically(schedule: str, tmp_path: Path) -> None:
    optim, total, k = OptimConfig(lr=1e-3, warmup_steps=3, schedule=schedule, min_lr_ratio=0.05), 10, 5
    straight = _lrs(optim, total)
    opt = _optimizer(optim)
    sched = build_scheduler(opt, optim, total)
    for _ in range(k):
        opt.step()
        sched.step()
    # as a checkpoint stores them: scheduler.json (JSON) and the optimizer's param groups
    ckpt.write_json(tmp_path / "scheduler.json", sched.state_dict())
    opt_state = opt.state_dict()
    resumed_opt = _optimizer(optim)
    resumed = build_scheduler(resumed_opt, optim, total)
    resumed.load_state_dict(ckpt.read_json(tmp_path / "scheduler.json"))
    resumed_opt.load_state_dict(opt_state)
    after = []
    for _ in range(total - k):
        after.append(resumed_opt.param_groups[0]["lr"])
        assert resumed.get_last_lr()[0] == after[-1]
        resumed_opt.step()
        resumed.step()
    assert [*after, resumed_opt.param_groups[0]["lr"]] == straight[k:]  # bit-exact, not approximately


@pytest.mark.parametrize("ratio", ["-0.1", "1.5"])
def test_min_lr_ratio_outside_zero_to_one_is_refused(ratio: str) -> None:
    with pytest.raises(MusarError, match=r"optim.min_lr_ratio must be in \[0, 1\]"):
        load_config(None, [f"optim.min_lr_ratio={ratio}", "optim.schedule=linear"])
