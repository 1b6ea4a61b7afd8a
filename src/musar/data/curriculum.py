"""The 3-stage curriculum (docs/design.md sec. 6) as a deterministic, resumable ``IterableDataset``.

Stage 1: single-subject samples only. Stage 2: a ``stage2_diptych_ratio`` share of random-pair
diptychs, the rest single. Stage 3: same-category diptychs. Optionally a ``musar_gen_ratio`` share
of the stage-2/3 diptych batches comes from MUSAR-Gen instead.

Determinism: the stream is a sequence of batches; batch ``b`` of a rank is a pure function of
``(seed, rank, world_size, b)`` (its own ``numpy`` generator), and its stage comes from the
optimizer step ``b // batches_per_step``. The kind (single / diptych / MUSAR-Gen) is drawn once per
batch, so every batch has one condition count and stacks into tensors without padding; over many
batches the stage-2 mix converges to the ratio. DataLoader worker ``w`` of ``W`` produces batches
``position + w + k * W`` and the DataLoader takes workers round-robin, so the rank's batch order (and the
data) is identical for any number of workers, while each worker and each rank sees different data.
Resuming is exact: set the position to the next batch index (``state_dict``/``load_state_dict``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch.utils.data

from musar.data.curriculum_config import CurriculumConfig
from musar.data.musar_gen import MusarGen
from musar.data.samples import DiptychSampler, Sample
from musar.data.subjects200k import Subjects200K
from musar.errors import MusarError

KINDS = ("single", "random_pair", "same_category", "musar_gen")


def stage_for_step(step: int, cfg: CurriculumConfig) -> int:
    """1, 2 or 3; steps past the end stay in stage 3."""
    if step < cfg.stage1_steps:
        return 1
    if step < cfg.stage1_steps + cfg.stage2_steps:
        return 2
    return 3


def batch_kind(stage: int, rng: np.random.Generator, cfg: CurriculumConfig, *, musar_gen: bool) -> str:
    """Which kind of batch to build in ``stage`` (one of :data:`KINDS`)."""
    if stage == 1:
        return "single"
    if stage == 2 and rng.random() >= cfg.stage2_diptych_ratio:
        return "single"
    if musar_gen and cfg.musar_gen_ratio > 0 and rng.random() < cfg.musar_gen_ratio:
        return "musar_gen"
    if stage == 3 and cfg.stage3_same_category:
        return "same_category"
    return "random_pair"


class CurriculumStream(torch.utils.data.IterableDataset):
    """Samples of the curriculum, ``batch_size`` consecutive ones per batch, all of one kind.

    Use with ``DataLoader(stream, batch_size=stream.batch_size, ...)`` (see
    :func:`musar.data.batches.make_loader`): each DataLoader batch is then exactly one stream batch.
    ``source`` may be None to train on MUSAR-Gen alone. ``stage`` pins every batch to one stage
    (previews). ``transform`` runs inside the worker (e.g. PIL -> tensors). ``num_batches`` makes
    the stream finite (counted from ``position``); by default it is infinite.
    """

    def __init__(
        self,
        source: Subjects200K | None,
        cfg: CurriculumConfig | None = None,
        *,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        musar_gen: MusarGen | None = None,
        transform: Callable[[Sample], Any] | None = None,
        num_batches: int | None = None,
        stage: int | None = None,
        seed: int = 0,
        batches_per_step: int = 1,
    ) -> None:
        super().__init__()
        if source is None and musar_gen is None:
            raise MusarError("the curriculum needs a Subjects200K source, a MUSAR-Gen source, or both")
        if not 0 <= rank < world_size:
            raise MusarError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise MusarError(f"batch_size must be >= 1, got {batch_size}")
        if batches_per_step < 1:
            raise MusarError(f"batches_per_step must be >= 1, got {batches_per_step}")
        if stage not in (None, 1, 2, 3):
            raise MusarError(f"stage must be 1, 2 or 3, got {stage}")
        self.source = source
        self.cfg = cfg or CurriculumConfig()
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.musar_gen = musar_gen
        self.transform = transform
        self.num_batches = num_batches
        self.stage = stage
        self.seed = seed
        self.batches_per_step = batches_per_step
        self.sampler = DiptychSampler(source) if source is not None else None
        self.position = start_step * batches_per_step  # next batch index of this rank

    # -- determinism -------------------------------------------------------------------------------

    def rng_for(self, b: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, self.world_size, b])

    def stage_of(self, b: int) -> int:
        return self.stage or stage_for_step(b // self.batches_per_step, self.cfg)

    def batch_at(self, b: int) -> list[Sample]:
        """Batch ``b`` of this rank: a pure function of (seed, rank, world_size, b)."""
        rng = self.rng_for(b)
        stage = self.stage_of(b)
        if self.sampler is None:
            kind = "musar_gen"
        else:
            kind = batch_kind(stage, rng, self.cfg, musar_gen=self.musar_gen is not None)
        draw = self._drawer(kind)
        samples = [draw(rng) for _ in range(self.batch_size)]
        for s in samples:
            s.meta.update(stage=stage, batch_index=b, rank=self.rank, batch_kind=kind)
        return samples

    def _drawer(self, kind: str) -> Callable[[np.random.Generator], Sample]:
        if kind == "musar_gen":
            assert self.musar_gen is not None
            return self.musar_gen.draw
        assert self.sampler is not None
        return {
            "single": self.sampler.single,
            "random_pair": self.sampler.random_pair,
            "same_category": self.sampler.same_category_pair,
        }[kind]

    # -- iteration ---------------------------------------------------------------------------------

    def iter_worker(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[Any]:
        """The samples worker ``w`` of ``W`` produces: batches ``position + w + k * W``."""
        stop = None if self.num_batches is None else self.position + self.num_batches
        # Offsets relative to the start position, so worker 0 always makes the first batch the
        # DataLoader asks for, also when resuming at an odd position.
        for b in itertools.count(self.position + worker_id, num_workers):
            if stop is not None and b >= stop:
                return
            for sample in self.batch_at(b):
                yield self.transform(sample) if self.transform is not None else sample

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.iter_worker(0, 1)
        return self.iter_worker(info.id, info.num_workers)

    # -- resuming ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is; set ``position`` to the next unconsumed batch index before saving.

        Iteration does not move ``position`` (DataLoader workers prefetch ahead of training); the
        training loop owns it, e.g. ``stream.position = batch.next_position`` after each step.
        """
        return {
            "position": self.position,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "config": asdict(self.cfg) | {"seed": self.seed, "batches_per_step": self.batches_per_step},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state["position"]``; refuses a state of a different seed or batch layout."""
        cfg = state.get("config", {})
        for key in ("seed", "batches_per_step"):
            if key in cfg and cfg[key] != getattr(self, key):
                raise MusarError(f"data state was saved with {key}={cfg[key]}, this run has {getattr(self, key)}")
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise MusarError(
                f"data state was saved with batch_size={state['batch_size']}, this run has {self.batch_size}"
            )
        self.position = int(state["position"])
