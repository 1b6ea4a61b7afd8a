"""A fixed space-to-depth image codec with the VAE interface FLUX pipelines use (issue 8, item 2).

The toy world is drawn from nine saturated colours without anti-aliasing, so there is nothing for a
learned autoencoder to compress away: a lossless rearrangement of every ``factor`` x ``factor``
block of pixels into channels is the cheapest codec that makes 64x64 images a 16x16 latent grid
(8x8 = 64 transformer tokens after FLUX's 2x2 packing). Encoding is exact and invertible, so the
codec never limits what the analyser can read back.

It subclasses diffusers' ``ModelMixin, ConfigMixin`` so ``save_pretrained`` / ``from_pretrained``
of the whole pipeline work. Diffusers records it in ``model_index.json`` as
``["musar.toy.codec", "ToyCodec"]`` and resolves that from ``sys.modules`` (it never imports a
named module itself), checking the class against ``ModelMixin`` *as an attribute of this module*:
hence the top-level import below, and ``import musar.toy.codec`` before loading a toy folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (diffusers' loader looks it up on this module)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin as _ModelMixin


@dataclass
class PointDistribution:
    """A posterior with all its mass on one point: ``sample`` and ``mode`` agree (no KL term)."""

    value: torch.Tensor

    def mode(self) -> torch.Tensor:
        return self.value

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        del generator  # deterministic codec: every sample is the mode
        return self.value


class ToyCodec(_ModelMixin, ConfigMixin):
    """Space-to-depth "VAE": (B, 3, H, W) in [-1, 1] <-> (B, 3*f*f, H/f, W/f), f = 2**(levels-1)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (1, 1, 1),
        in_channels: int = 3,
        shift_factor: float = 0.0,
        scaling_factor: float = 1.0,
        latent_channels: int | None = None,
    ) -> None:
        super().__init__()
        del latent_channels  # derived below; accepted so a saved config (which records it) loads cleanly
        # ``block_out_channels`` only carries the down-sampling depth, as FluxPipeline reads it
        # (vae_scale_factor = 2 ** (len - 1)); the values themselves are unused.
        self.factor = 2 ** (len(block_out_channels) - 1)
        self.register_to_config(latent_channels=in_channels * self.factor**2)
        # One persistent buffer: ``.dtype`` / ``.device`` read it, and ``save_pretrained`` then writes
        # a weights file, which ``from_pretrained`` insists on finding.
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def latent_channels(self) -> int:
        return int(self.config.in_channels) * self.factor**2

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[PointDistribution]:
        dist = PointDistribution(F.pixel_unshuffle(x, self.factor))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)  # type: ignore[arg-type]

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None) -> object:
        del generator
        sample = F.pixel_shuffle(z, self.factor).clamp(-1.0, 1.0)
        if not return_dict:
            return (sample,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.mode(), return_dict=False)[0]  # type: ignore[union-attr,index]
