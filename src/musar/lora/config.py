"""The dual-branch LoRA's configuration (docs/design.md sec. 5): ranks, scales, targets, mode.

Pure data with help text; the training config uses this class as its ``lora`` section, and LoRA
files carry it in their safetensors header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Branch = Literal["noise", "subject", "shared"]

DEFAULT_TARGETS: tuple[str, ...] = (
    "x_embedder",
    "context_embedder",
    "transformer_blocks.*.attn.to_q",
    "transformer_blocks.*.attn.to_k",
    "transformer_blocks.*.attn.to_v",
    "transformer_blocks.*.attn.to_out.0",
    "transformer_blocks.*.attn.add_q_proj",
    "transformer_blocks.*.attn.add_k_proj",
    "transformer_blocks.*.attn.add_v_proj",
    "transformer_blocks.*.attn.to_add_out",
    "transformer_blocks.*.ff.net.0.proj",
    "transformer_blocks.*.ff.net.2",
    "transformer_blocks.*.ff_context.net.0.proj",
    "transformer_blocks.*.ff_context.net.2",
    "single_transformer_blocks.*.attn.to_q",
    "single_transformer_blocks.*.attn.to_k",
    "single_transformer_blocks.*.attn.to_v",
    "single_transformer_blocks.*.proj_mlp",
    "single_transformer_blocks.*.proj_out",
)


@dataclass
class BranchLoRAConfig:
    noise_rank: int = field(default=4, metadata={"help": "Rank of the LoRA on NOISE rows (paper: 4)."})
    subject_rank: int = field(default=128, metadata={"help": "Rank of the LoRA on condition rows (paper: 128)."})
    noise_alpha: float | None = field(default=None, metadata={"help": "Scale numerator for the noise branch; None = rank (scale 1)."})
    subject_alpha: float | None = field(default=None, metadata={"help": "Scale numerator for the subject branch; None = rank (scale 1)."})
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": "Glob patterns of linear module paths to adapt."})
    mode: Literal["dual", "shared"] = field(default="dual", metadata={"help": "'dual' (paper) or 'shared': one LoRA on every row (ablation)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.mode not in ("dual", "shared"):
            raise ValueError(f"unknown LoRA mode {self.mode!r}; expected 'dual' or 'shared'")
        if min(self.noise_rank, self.subject_rank) < 1:
            raise ValueError("LoRA ranks must be >= 1")

    def branches(self) -> dict[str, tuple[int, float]]:
        """branch name -> (rank, scaling)."""

        def scale(rank: int, alpha: float | None) -> float:
            return (alpha if alpha is not None else rank) / rank

        if self.mode == "shared":
            return {"shared": (self.subject_rank, scale(self.subject_rank, self.subject_alpha))}
        return {
            "noise": (self.noise_rank, scale(self.noise_rank, self.noise_alpha)),
            "subject": (self.subject_rank, scale(self.subject_rank, self.subject_alpha)),
        }
