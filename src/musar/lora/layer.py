"""Dual-branch, token-selective LoRA (docs/design.md sec. 5): the layer, as in peft's config |
layer | model split (:mod:`musar.lora.config`, here, :mod:`musar.lora.model` for the injection).

One frozen base weight, two low-rank branches: the *noise* branch (rank 4) acts on NOISE rows,
the *subject* branch (rank 128) on condition rows (CI and CT); PROMPT rows get no LoRA at all.
Each branch's delta is computed only on its own row segment: rows are sliced, never masked by
multiplying with zeros over the whole sequence.

Which rows a linear layer sees depends on where diffusers calls it: image-stream layers see
``[NOISE | CI...]``, text-stream layers ``[PROMPT | CT...]``, single-stream layers the whole
joint sequence and the final ``proj_out`` the NOISE rows alone. Each wrapped layer knows its
stream; one shared :class:`RowPlan` (updated from the :class:`~musar.models.layout.TokenLayout`
at the start of every forward) says how long each row group is.

The wrapper is also the *host* of standard (peft) LoRAs stacked on top: its ``base_layer`` may be
a peft ``LoraLayer`` around the frozen linear, so a community FLUX LoRA adapts every token as
peft computes it, or only the token kinds it was loaded for (:mod:`musar.lora.stacking`).

The ablation ``mode="shared"`` ("without debiasing", paper Fig. 8) applies one LoRA to every row.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from musar.lora.config import BranchLoRAConfig
from musar.lora.peft_rows import is_peft_linear, peft_delta, peft_output_without, restricted_active
from musar.models.layout import Kind, TokenLayout

Stream = Literal["image", "text", "joint", "output"]


class RowPlan:
    """What every wrapped layer of one model shares: the row groups of the current forward, the
    branch mode, the MUSAR LoRA's name and weight, and the token kinds of restricted peft LoRAs."""

    def __init__(self, mode: str = "dual") -> None:
        self.mode = mode
        self.layout: TokenLayout | None = None
        self.adapter_name = "musar"  # the MUSAR LoRA's name in set_adapters / get_list_adapters
        self.branch_scale = 1.0  # its weight (set_adapters); 1.0 leaves outputs bit-identical
        self.branches_enabled = True  # disable_lora() / enable_lora()
        self.adapter_kinds: dict[str, frozenset[Kind]] = {}  # peft adapters restricted to token kinds

    def set(self, layout: TokenLayout) -> None:
        self.layout = layout

    def rows(self, stream: Stream, length: int) -> list[tuple[int, Kind]]:
        """``[(row count, token kind), ...]`` of a ``stream`` input with ``length`` rows."""
        lay = self.layout
        if lay is None:
            raise RuntimeError("branch LoRA layers need a token layout: call them through MusarTransformer.forward")
        n_prompt, n_ct = lay.text_split
        n_noise, n_ci = lay.image_split
        plans: dict[str, list[tuple[int, Kind]]] = {
            "image": [(n_noise, Kind.NOISE), (n_ci, Kind.COND_IMAGE)],
            "text": [(n_prompt, Kind.PROMPT), (n_ct, Kind.COND_TEXT)],
            "joint": [(n_prompt, Kind.PROMPT), (n_ct, Kind.COND_TEXT), (n_noise, Kind.NOISE), (n_ci, Kind.COND_IMAGE)],
            "output": [(n_noise, Kind.NOISE)],
        }
        plan = plans[stream]
        if sum(n for n, _ in plan) != length:
            raise RuntimeError(f"{stream}-stream LoRA layer got {length} rows but the layout expects {sum(n for n, _ in plan)}")
        return plan

    def branch(self, kind: Kind) -> str | None:
        """The MUSAR branch that adapts rows of ``kind`` (None: PROMPT rows get none)."""
        if self.mode == "shared":
            return "shared"
        if kind == Kind.NOISE:
            return "noise"
        return None if kind == Kind.PROMPT else "subject"


class BranchLoRALinear(nn.Module):
    """A frozen linear plus per-branch low-rank deltas applied to their own rows only.

    ``base_layer`` is an ``nn.Linear`` or a peft LoRA layer around one; ``config=None`` makes a
    host without MUSAR branches (for a peft LoRA restricted to some token kinds).
    """

    def __init__(
        self, base_layer: nn.Module, config: BranchLoRAConfig | None, stream: Stream, plan: RowPlan
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.stream = stream
        self.plan = plan
        self.dropout: nn.Module = nn.Identity()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        if config is not None:
            self.add_branches(config)

    def add_branches(self, config: BranchLoRAConfig) -> None:
        if len(self.lora_A):
            raise ValueError("this layer already has branch LoRA weights")
        linear = base_linear(self.base_layer)
        dev, dtype = linear.weight.device, compute_dtype(linear)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for name, (rank, scale) in config.branches().items():
            self.lora_A[name] = nn.Linear(linear.in_features, rank, bias=False, device=dev, dtype=dtype)
            self.lora_B[name] = nn.Linear(rank, linear.out_features, bias=False, device=dev, dtype=dtype)
            # peft's default: A random, B zero, so an injected model starts exactly at the base.
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
            self.scaling[name] = scale

    def remove_branches(self) -> None:
        self.lora_A, self.lora_B, self.scaling, self.dropout = nn.ModuleDict(), nn.ModuleDict(), {}, nn.Identity()

    def delta(self, branch: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[branch], self.lora_B[branch]
        out = b(a(self.dropout(x.to(a.weight.dtype)))) * self.scaling[branch]
        return out if self.plan.branch_scale == 1.0 else out * self.plan.branch_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        branches = len(self.lora_A) > 0 and plan.branches_enabled
        restricted = restricted_active(self.base_layer, plan.adapter_kinds)
        if not branches and not restricted:
            return self.base_layer(x)
        # Restricted peft adapters are added below on their rows; peft computes the others.
        out = peft_output_without(self.base_layer, x, restricted) if restricted else self.base_layer(x)
        plan_rows = [(n, kind) for n, kind in plan.rows(self.stream, x.shape[-2]) if n]
        lengths = [n for n, _ in plan_rows]
        # split, not slicing: a slice's backward writes its gradient into a zero-filled copy of
        # the whole input, once per slice and layer; split's backward is one cat.
        pieces = []
        for (_, kind), rows, xs in zip(plan_rows, out.split(lengths, dim=-2), x.split(lengths, dim=-2), strict=True):
            branch = plan.branch(kind) if branches else None
            if branch is not None:
                rows = rows + self.delta(branch, xs).to(out.dtype)
            for name, kinds in restricted:
                if kind in kinds:
                    rows = rows + peft_delta(self.base_layer, name, xs).to(out.dtype)
            pieces.append(rows)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)


def compute_dtype(layer: nn.Linear) -> torch.dtype:
    """The dtype a linear computes in: its weight's, unless the weight is packed integers
    (bitsandbytes nf4, GGUF), whose layers carry the compute dtype themselves."""
    if layer.weight.dtype.is_floating_point:
        return layer.weight.dtype
    return getattr(layer, "compute_dtype", None) or torch.float32


def base_linear(module: nn.Module) -> nn.Linear:
    """The frozen ``nn.Linear`` inside a host and/or a peft layer."""
    while not isinstance(module, nn.Linear):
        module = module.get_base_layer() if is_peft_linear(module) else module.base_layer
    return module
