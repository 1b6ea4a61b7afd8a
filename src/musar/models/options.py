"""How attention is routed: :class:`RoutingOptions` (docs/design.md sec. 3, 4), plain data with help text.

Kept free of torch at import so the training config, ``musar train --help-config`` and the CLI's
validation read it without loading the model stack; the routing itself is
:mod:`musar.models.routing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

# The routed-attention backends and the default of everything that generates, declared once for
# every front end that offers them (the CLI's --attention, the UI's backend choice).
Backend = Literal["auto", "fast", "flex", "reference"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_BACKEND: Backend = "auto"


@dataclass
class RoutingOptions:
    """How attention is routed. Defaults reproduce the paper."""

    static: bool = field(default=True, metadata={"help": "Static routing (paper 3.2.2). Off = every token sees every token (ablation)."})
    dynamic: bool = field(default=True, metadata={"help": "Dynamic routing of NOISE queries to one condition (paper 3.3); acts for c >= 2, or c >= 1 with given route candidates (boxes)."})
    per_head: bool = field(default=False, metadata={"help": "Route per attention head instead of on the head-mean affinity."})
    start_layer: int = field(default=0, metadata={"help": "First layer (double blocks first, then single) where dynamic routing applies."})
    start_step: int = field(default=0, metadata={"help": "First denoising step where dynamic routing applies."})
    independent_conditions: bool = field(default=False, metadata={"help": "Also block COND -> NOISE so condition K/V can be cached (ours; needs weights trained this way)."})
    backend: Backend = field(default=DEFAULT_BACKEND, metadata={"help": "How routing is computed: 'auto' (flex on CUDA, fast elsewhere), 'fast' (grouped unmasked attention, no L x L mask), 'flex' (FlexAttention block mask) or 'reference' (dense mask). Kernels come from diffusers' attention backend (set_attention_backend), except flex's."})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.start_layer < 0 or self.start_step < 0:
            raise ValueError("start_layer and start_step must be >= 0")

    def dynamic_active(self, layer: int, step: int, num_conditions: int, given: bool = False) -> bool:
        """Whether routes (from S*, or given) restrict NOISE rows in this layer at this step.

        S* needs two subjects to choose between; given route candidates (``given``) also act for
        a single subject, whose box then limits where its reference is read.
        """
        enough = num_conditions >= 2 or (given and num_conditions >= 1)
        return self.dynamic and enough and layer >= self.start_layer and step >= self.start_step

    def resolved_backend(self, device: torch.device | str) -> str:
        return resolve_backend(self.backend, device)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ``backend`` means on ``device``.

    ``auto`` picks FlexAttention on CUDA: it is one fused kernel per call with no host sync, so
    it also works inside ``torch.compile`` graphs and CUDA graphs, and its cost follows the kept
    blocks. Everywhere else flex only has an unfused, forward-only implementation, so ``auto``
    falls back to ``fast`` (which, under ``torch.compile``, routes without a host sync too).
    ``musar bench`` measures both; see bench/README.md.
    """
    if backend != "auto":
        return backend
    import torch

    return "flex" if torch.device(device).type == "cuda" else "fast"
