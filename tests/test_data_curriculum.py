"""Curriculum: stages, mixes, determinism per seed/rank/worker, resuming, DataLoader integration."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from musar.data.batches import BatchTransform, make_loader
from musar.data.curriculum import CurriculumConfig, CurriculumStream, batch_kind, stage_for_step
from musar.data.musar_gen import MusarGen
from musar.data.subjects200k import BadRowWarning, Subjects200K
from musar.errors import MusarError

import data_fixtures as fx

pytestmark = pytest.mark.filterwarnings("ignore::musar.data.subjects200k.BadRowWarning")

CFG = CurriculumConfig(stage1_steps=4, stage2_steps=6, stage3_steps=4)
SEED = 7


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("curriculum")


@pytest.fixture(scope="module")
def source(root: Path) -> Subjects200K:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadRowWarning)
        return Subjects200K.open(str(fx.write_subjects(root / "s.parquet")), cache_dir=str(root / "cache"))


@pytest.fixture(scope="module")
def musar_gen(root: Path) -> MusarGen:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadRowWarning)
        return MusarGen.open(str(fx.write_musar_gen(root / "mg.parquet")), cache_dir=str(root / "cache"))


def fingerprint(samples: Any) -> list[tuple[Any, ...]]:
    """What identifies a sample: its kind, rows, views, order, and the pixels of its target."""
    out = []
    for s in samples:
        m = s.meta
        rows = (m["left"]["row_id"], m["right"]["row_id"]) if m["kind"] == "diptych" else (m["row_id"],)
        out.append((m["batch_index"], m["batch_kind"], rows, s.prompt, s.target.tobytes()))
    return out


def test_default_config_is_the_papers() -> None:
    cfg = CurriculumConfig()
    assert (cfg.stage1_steps, cfg.stage2_steps, cfg.stage3_steps) == (20000, 10000, 10000)
    assert cfg.stage2_diptych_ratio == 0.8 and cfg.stage3_same_category and cfg.musar_gen_ratio == 0.0
    with pytest.raises(MusarError, match="stage2_diptych_ratio"):
        CurriculumConfig(stage2_diptych_ratio=1.5)


def test_stage_for_step() -> None:
    cfg = CurriculumConfig()
    assert [stage_for_step(s, cfg) for s in (0, 19999, 20000, 29999, 30000, 39999, 10**6)] == [
        1,
        1,
        2,
        2,
        3,
        3,
        3,
    ]


def test_stage2_mix_within_tolerance(source: Subjects200K) -> None:
    kinds = Counter(batch_kind(2, np.random.default_rng([1, i]), CFG, musar_gen=False) for i in range(20000))
    assert set(kinds) == {"single", "random_pair"}
    assert abs(kinds["random_pair"] / 20000 - 0.8) < 0.02
    # The same mix through the real stream (per batch; 4 sigma tolerance).
    stream = CurriculumStream(source, CFG, seed=SEED, stage=2, num_batches=400)
    dips = sum(s.num_conditions == 2 for s in stream)
    assert abs(dips / 400 - 0.8) < 0.08


def test_stages_follow_steps(source: Subjects200K) -> None:
    cfg = CurriculumConfig(stage1_steps=3, stage2_steps=3, stage3_steps=3)
    samples = list(CurriculumStream(source, cfg, batch_size=2, num_batches=18, seed=1, batches_per_step=2))
    stages = [s.meta["stage"] for s in samples]
    assert stages == [1] * 12 + [2] * 12 + [3] * 12  # 3 steps x 2 batches x 2 samples per stage
    for s in samples:
        assert s.num_conditions == (1 if s.meta["batch_kind"] == "single" else 2)
        if s.meta["stage"] == 1:
            assert s.meta["batch_kind"] == "single"
        if s.meta["stage"] == 3:
            assert s.meta["batch_kind"] == "same_category" and s.meta["same_category"]
    for b in range(18):  # a batch is all one kind, so it stacks
        assert len({s.meta["batch_kind"] for s in samples[2 * b : 2 * b + 2]}) == 1


def test_same_seed_same_stream_other_rank_or_seed_differs(source: Subjects200K) -> None:
    def run(**kw: Any) -> list[tuple[Any, ...]]:
        seed = kw.pop("seed", 7)
        cfg = CurriculumConfig(stage1_steps=0, stage2_steps=100)
        return fingerprint(CurriculumStream(source, cfg, batch_size=2, num_batches=12, seed=seed, **kw))

    base = run(rank=0, world_size=2)
    assert base == run(rank=0, world_size=2)
    assert base != run(rank=1, world_size=2)
    assert base != run(rank=0, world_size=2, seed=8)


def test_workers_see_different_parts_of_one_stream(source: Subjects200K) -> None:
    stream = CurriculumStream(source, CFG, seed=SEED, batch_size=2, num_batches=10, start_step=4)
    whole = fingerprint(stream.iter_worker(0, 1))
    w0, w1 = fingerprint(stream.iter_worker(0, 2)), fingerprint(stream.iter_worker(1, 2))
    assert w0 != w1 and not set(w0) & set(w1)
    assert {b for b, *_ in w0} == {4, 6, 8, 10, 12} and {b for b, *_ in w1} == {5, 7, 9, 11, 13}
    interleaved = [x for i in range(5) for x in w0[2 * i : 2 * i + 2] + w1[2 * i : 2 * i + 2]]
    assert interleaved == whole


def test_resume_from_a_data_position(source: Subjects200K) -> None:
    full = fingerprint(CurriculumStream(source, CFG, seed=SEED, batch_size=3, num_batches=20))
    stream = CurriculumStream(source, CFG, seed=SEED, batch_size=3, num_batches=10)
    state = stream.state_dict() | {"position": 10}
    resumed = CurriculumStream(source, CFG, seed=SEED, batch_size=3, num_batches=10)
    resumed.load_state_dict(state)
    assert fingerprint(resumed) == full[30:]
    by_step = CurriculumStream(source, CFG, seed=SEED, batch_size=3, num_batches=10, start_step=10)
    assert fingerprint(by_step) == full[30:]
    other = CurriculumStream(source, CFG, batch_size=3, seed=8)
    with pytest.raises(MusarError, match="seed"):
        other.load_state_dict(state)


def test_musar_gen_mixed_or_alone(source: Subjects200K, musar_gen: MusarGen) -> None:
    cfg = CurriculumConfig(stage1_steps=0, stage2_steps=0, stage3_steps=10, musar_gen_ratio=0.5)
    kinds = Counter(
        s.meta["batch_kind"] for s in CurriculumStream(source, cfg, musar_gen=musar_gen, num_batches=60, seed=3)
    )
    assert set(kinds) == {"musar_gen", "same_category"} and 15 <= kinds["musar_gen"] <= 45
    alone = list(CurriculumStream(None, cfg, musar_gen=musar_gen, batch_size=2, num_batches=4, seed=3))
    assert len(alone) == 8 and all(s.meta["kind"] == "musar_gen" and s.num_conditions == 2 for s in alone)
    with pytest.raises(MusarError):
        CurriculumStream(None, cfg)


def test_dataloader_with_workers_matches_in_process(source: Subjects200K) -> None:
    tf = BatchTransform(view_size=16, condition_size=8)

    def batches(workers: int) -> list[tuple[Any, ...]]:
        stream = CurriculumStream(source, CFG, seed=SEED, batch_size=2, num_batches=8, start_step=3)
        return [
            (b.num_conditions, b.prompts, b.next_position, b.target.sum().item())
            for b in make_loader(stream, transform=tf, num_workers=workers)
        ]

    serial = batches(0)
    assert [pos for *_, pos, _ in serial] == list(range(4, 12))
    assert serial == batches(2)
    stream = CurriculumStream(source, CFG, seed=SEED, batch_size=2, num_batches=1)
    batch = next(iter(make_loader(stream, transform=tf)))
    assert batch.target.dtype == torch.float32 and batch.target.shape == (2, 3, 16, 16)
