"""Condition K/V cache for ``independent_conditions`` (docs/design.md sec. 3).

With ``independent_conditions=True`` a condition's queries see only their own condition, so
its hidden states in every layer depend on the reference latents, the phrase embedding,
temb(t_cond) (which depends on the pooled prompt embedding and the guidance) and the weights,
but never on the noisy latents or the step. Its keys and values per layer can therefore be
computed once per image (:meth:`MusarTransformer.build_condition_cache`) and every denoising
step then runs only the [PROMPT, NOISE] rows: their queries attend to their own keys plus the
cached condition keys, under the same routing rules. The result equals the uncached forward
with ``independent_conditions=True`` (up to float summation order).

The cache stores one (B, H, c x l', d) key and value tensor per attention layer, in the order
of a condition-only layout: [CT^0, ..., CT^{c-1}, CI^0, ..., CI^{c-1}]. For FLUX.1-dev at
c = 2 with 512x512 references that is 57 layers x 2 x 24 x 2112 x 128 values, ~1.5 GiB in bf16
per sample.

The cache is for inference: it is built without autograd and holds no graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from musar.models.layout import TokenLayout
from musar.models.options import RoutingOptions


@dataclass
class ConditionCache:
    """Per-layer condition keys/values plus what they were computed from."""

    cond_image: tuple[int, ...]
    cond_text: tuple[int, ...]
    options: RoutingOptions
    spans: torch.Tensor | None  # (B, c, 2) subject spans in the main prompt
    pooled_projections: torch.Tensor  # temb(t_cond) depends on these ...
    guidance: torch.Tensor | None  # ... and on this
    timestep: float = 0.0
    # (B, n, c) bool given routes of the NOISE tokens (ConditionInputs.candidates); like the
    # spans they belong to the image, so the cache carries them to every step.
    candidates: torch.Tensor | None = None
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H, Lc, d)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_cacheable(self.options)

    @property
    def num_conditions(self) -> int:
        return len(self.cond_image)

    @property
    def batch(self) -> int:
        return self.pooled_projections.shape[0]

    @property
    def cond_layout(self) -> TokenLayout:
        """The condition-only layout the cache is computed on (no PROMPT, no NOISE rows)."""
        return TokenLayout(0, 0, self.cond_image, self.cond_text)

    def layout(self, prompt: int, noise: int) -> TokenLayout:
        """The full layout of a forward that reads this cache."""
        return TokenLayout(prompt, noise, self.cond_image, self.cond_text)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[layer], self.values[layer] = k.detach(), v.detach()

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s cached condition keys and values (appended to its main keys/values)."""
        if layer not in self.keys:
            raise KeyError(f"the condition cache has no layer {layer}; was it built with this model?")
        return self.keys[layer], self.values[layer]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())

    def check_inputs(
        self, pooled_projections: torch.Tensor, guidance: torch.Tensor | None, options: RoutingOptions
    ) -> None:
        """Refuse a forward whose condition rows would differ from the cached ones.

        Comparing the values reads them on the host, which a compiled forward cannot trace:
        inside ``torch.compile`` only the shapes are checked.
        """
        check_cacheable(options)
        values = not torch.compiler.is_compiling()
        if pooled_projections.shape != self.pooled_projections.shape or (
            values and not torch.equal(pooled_projections, self.pooled_projections.to(pooled_projections))
        ):
            raise ValueError("the condition cache was built for other pooled_projections (temb(t_cond) depends on them)")
        if (guidance is None) != (self.guidance is None) or (
            values and guidance is not None and not torch.equal(guidance, self.guidance.to(guidance))
        ):
            raise ValueError("the condition cache was built for another guidance value (temb(t_cond) depends on it)")


def check_cacheable(options: RoutingOptions) -> None:
    if not options.independent_conditions or not options.static:
        raise ValueError(
            "a condition cache needs RoutingOptions(independent_conditions=True, static=True): otherwise "
            "condition tokens see the noisy latents and change at every step"
        )
