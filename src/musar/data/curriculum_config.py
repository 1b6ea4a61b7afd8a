"""The 3-stage curriculum's configuration (docs/design.md sec. 6): stage lengths and mixes, plain data.

Torch-free, so the training config reads it without loading the data stack; the stream that
follows it is :mod:`musar.data.curriculum`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from musar.errors import MusarError


@dataclass
class CurriculumConfig:
    """Stage lengths and mixes of the training data curriculum."""

    stage1_steps: int = field(
        default=20000, metadata={"help": "Optimizer steps of stage 1 (single subject only)."}
    )
    stage2_steps: int = field(
        default=10000, metadata={"help": "Optimizer steps of stage 2 (random-pair mix)."}
    )
    stage3_steps: int = field(
        default=10000, metadata={"help": "Optimizer steps of stage 3 (same-category pairs)."}
    )
    stage2_diptych_ratio: float = field(
        default=0.8, metadata={"help": "Share of stage-2 batches that are diptychs (the rest single)."}
    )
    stage3_same_category: bool = field(
        default=True, metadata={"help": "Stage 3 pairs subjects of one category (else random pairs)."}
    )
    musar_gen_ratio: float = field(
        default=0.0, metadata={"help": "Share of stage-2/3 diptych batches drawn from MUSAR-Gen, if given."}
    )

    def __post_init__(self) -> None:
        for name in ("stage1_steps", "stage2_steps", "stage3_steps"):
            if getattr(self, name) < 0:
                raise MusarError(f"curriculum {name} must be >= 0, got {getattr(self, name)}")
        for name in ("stage2_diptych_ratio", "musar_gen_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise MusarError(f"curriculum {name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps + self.stage3_steps
