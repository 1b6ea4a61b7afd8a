"""Dual-branch, token-selective LoRA (DESIGN sec. 5), in peft's config / layer / injection split.

One frozen base weight, two low-rank branches: the *noise* branch (rank 4) acts on NOISE rows,
the *subject* branch (rank 128) on condition rows (CI and CT); PROMPT rows get no LoRA at all.
Each branch's delta is computed only on its own row segment: rows are sliced, never masked by
multiplying with zeros over the whole sequence.

Which rows a linear layer sees depends on where diffusers calls it: image-stream layers see
``[NOISE | CI...]``, text-stream layers ``[PROMPT | CT...]`` and single-stream layers the whole
joint sequence. Each wrapped layer knows its stream; one shared :class:`RowPlan` (updated from
the :class:`~musar.models.layout.TokenLayout` at the start of every forward) says how long each row
group is.

The ablation ``mode="shared"`` ("without debiasing", paper Fig. 8) applies one LoRA to every row.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from musar.lora.config import BranchLoRAConfig
from musar.models.layout import TokenLayout

Stream = Literal["image", "text", "joint"]

class RowPlan:
    """Row groups of each stream for the current forward: [(length, branch or None), ...]."""

    def __init__(self, mode: str = "dual") -> None:
        self.mode = mode
        self.layout: TokenLayout | None = None

    def set(self, layout: TokenLayout) -> None:
        self.layout = layout

    def rows(self, stream: Stream, length: int) -> list[tuple[int, str | None]]:
        lay = self.layout
        if lay is None:
            raise RuntimeError("branch LoRA layers need a token layout: call them through MusarTransformer.forward")
        if self.mode == "shared":
            return [(length, "shared")]
        n_prompt, n_ct = lay.text_split
        n_noise, n_ci = lay.image_split
        plans: dict[str, list[tuple[int, str | None]]] = {
            "image": [(n_noise, "noise"), (n_ci, "subject")],
            "text": [(n_prompt, None), (n_ct, "subject")],
            "joint": [(n_prompt, None), (n_ct, "subject"), (n_noise, "noise"), (n_ci, "subject")],
        }
        plan = plans[stream]
        if sum(n for n, _ in plan) != length:
            raise RuntimeError(f"{stream}-stream LoRA layer got {length} rows but the layout expects {sum(n for n, _ in plan)}")
        return plan


class BranchLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus per-branch low-rank deltas applied to their own rows only."""

    def __init__(self, base_layer: nn.Linear, config: BranchLoRAConfig, stream: Stream, plan: RowPlan) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.stream = stream
        self.plan = plan
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        dev, dtype = base_layer.weight.device, compute_dtype(base_layer)
        for name, (rank, scale) in config.branches().items():
            self.lora_A[name] = nn.Linear(base_layer.in_features, rank, bias=False, device=dev, dtype=dtype)
            self.lora_B[name] = nn.Linear(rank, base_layer.out_features, bias=False, device=dev, dtype=dtype)
            # peft's default: A random, B zero, so an injected model starts exactly at the base.
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
            self.scaling[name] = scale

    def delta(self, branch: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[branch], self.lora_B[branch]
        return b(a(self.dropout(x.to(a.weight.dtype)))) * self.scaling[branch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        pieces, pos = [], 0
        for length, branch in self.plan.rows(self.stream, x.shape[-2]):
            if length == 0:
                continue
            rows = out[..., pos : pos + length, :]
            if branch is not None:
                rows = rows + self.delta(branch, x[..., pos : pos + length, :]).to(out.dtype)
            pieces.append(rows)
            pos += length
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)


def compute_dtype(layer: nn.Linear) -> torch.dtype:
    """The dtype a linear computes in: its weight's, unless the weight is packed integers
    (bitsandbytes nf4, GGUF), whose layers carry the compute dtype themselves."""
    if layer.weight.dtype.is_floating_point:
        return layer.weight.dtype
    return getattr(layer, "compute_dtype", None) or torch.float32


def stream_of(module_path: str) -> Stream:
    """Which rows a linear layer sees, from its path in ``FluxTransformer2DModel``."""
    if module_path.startswith("single_transformer_blocks."):
        return "joint"
    leaf = module_path.split(".")
    if module_path == "context_embedder" or "ff_context" in leaf or leaf[-1] in {
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    }:
        return "text"
    return "image"


def matching_linears(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    names = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(fnmatch.fnmatchcase(name, t) for t in targets)
    ]
    unmatched = [t for t in targets if not any(fnmatch.fnmatchcase(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"LoRA target patterns match no linear layer: {unmatched}")
    return names


def inject_branch_lora(model: nn.Module, config: BranchLoRAConfig) -> RowPlan:
    """Wrap the target linears of ``model`` in :class:`BranchLoRALinear`; freeze everything else."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has a branch LoRA; remove it first")
    plan = RowPlan(config.mode)
    model.requires_grad_(False)
    for name in matching_linears(model, config.targets):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = BranchLoRALinear(getattr(parent, attr), config, stream_of(name), plan)
        setattr(parent, attr, wrapper)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    model.lora_config = config
    model.lora_plan = plan
    return plan


def remove_branch_lora(model: nn.Module) -> None:
    """Put the plain base linears back (drops the LoRA weights)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, BranchLoRALinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, mod.base_layer)
    model.lora_config = None
    model.lora_plan = None


def lora_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            yield name, p


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for _, p in lora_named_parameters(model):
        yield p
