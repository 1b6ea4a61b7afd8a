"""A small learned image codec with the VAE interface FLUX pipelines use (issue 8, item 2).

Why learned, and why this shape. A first toy base used a lossless space-to-depth codec: 64x64
images became 64 tokens of 192 raw pixel values, as wide as the 192-wide transformer itself. Its
residual stream had no room left for anything but the pixels, and after 1500 steps it still sampled noisy colour fields. FLUX works in a compressed latent space for a
reason, so the toy does too: 64x64 RGB -> 16 x 16 x 16 latents (64 tokens of 64 values).

* **Encoder**: pixel-unshuffle by 4, then convolutions at 16x16. All the work happens at the
  latent resolution, which keeps training to a few minutes of CPU.
* **Decoder**: convolutions at 16x16, then pixel-shuffle to *logits over the world's palette*
  per pixel. The world is drawn from nine colours with no anti-aliasing, so the decoder
  classifies instead of regressing. Cross-entropy learns crisp edges much faster than an L1
  reconstruction does (that one was still blurry after 1500 steps), and decoding picks the most
  likely colour. This is the toy's version of what a real VAE decoder does: it maps imperfect
  latents onto its training domain. It does not invent structure. A wrong shape, a missing
  subject or a leaked colour in the latent stays wrong in the image, which is what the analyser
  scores.
* **Robustness**: training adds Gaussian noise to the latents, so latents a diffusion model
  samples imperfectly still decode sensibly.

It subclasses diffusers' ``ModelMixin, ConfigMixin``, so the whole pipeline's ``save_pretrained``
and ``from_pretrained`` work. Diffusers records it in ``model_index.json`` as
``["musar.toy.codec", "ToyCodec"]``. It never imports that module itself: it resolves it from
``sys.modules`` and checks the class against ``ModelMixin`` *as an attribute of this module*.
Hence the top-level import below, and the ``import musar.toy.codec`` before loading a toy folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (diffusers' loader looks it up on this module)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin as _ModelMixin
from PIL import Image
from torch import nn


@dataclass
class PointDistribution:
    """A posterior with all its mass on one point: ``sample`` and ``mode`` agree (no KL term)."""

    value: torch.Tensor

    def mode(self) -> torch.Tensor:
        return self.value

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        del generator  # deterministic encoder: every sample is the mode
        return self.value


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class ToyCodec(_ModelMixin, ConfigMixin):
    """(B, 3, H, W) in [-1, 1] <-> (B, latent_channels, H/f, W/f) with f = 2**(len(block_out_channels)-1).

    ``palette`` lists the RGB colours (0-255) that the decoder chooses between.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        palette: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (255, 255, 255)),
        latent_channels: int = 16,
        width: int = 64,
        block_out_channels: tuple[int, ...] = (1, 1, 1),
        in_channels: int = 3,
        shift_factor: float = 0.0,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        # ``block_out_channels`` only carries the down-sampling depth, as FluxPipeline reads it
        # (vae_scale_factor = 2 ** (len - 1)); the values themselves are unused.
        self.factor = 2 ** (len(block_out_channels) - 1)
        f2, k = self.factor**2, len(palette)
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(self.factor), nn.Conv2d(in_channels * f2, width, 3, padding=1),
            _Residual(width), nn.SiLU(), nn.Conv2d(width, latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), _Residual(width), _Residual(width), nn.SiLU(),
            nn.Conv2d(width, k * f2, 3, padding=1), nn.PixelShuffle(self.factor),
        )
        colours = torch.tensor(palette, dtype=torch.float32) / 127.5 - 1.0
        self.register_buffer("colours", colours, persistent=False)  # (K, 3) in [-1, 1]

    def labels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W) index of the nearest palette colour of every pixel: the decoder's target."""
        colours = self.colours[None, :, :, None, None].to(pixels.dtype)
        # In chunks: a (B, K, 3, H, W) difference for a whole 12k-scene pool would be 5 GB.
        return torch.cat([((chunk[:, None] - colours) ** 2).sum(2).argmin(1) for chunk in pixels.split(256)])

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[PointDistribution]:
        dist = PointDistribution(self.encoder(x))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)  # type: ignore[arg-type]

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) palette logits per pixel."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None) -> object:
        del generator
        index = self.logits(z).argmax(1)  # (B, H, W)
        sample = self.colours.to(z.dtype)[index].permute(0, 3, 1, 2).contiguous()
        if not return_dict:
            return (sample,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.mode(), return_dict=False)[0]  # type: ignore[union-attr,index]


@torch.no_grad()
def codec_round_trip(codec: ToyCodec, image: Image.Image) -> Image.Image:
    """``image`` encoded and decoded: what the codec lets through (the analyser's ceiling)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    y = codec(x.to(codec.dtype))[0].permute(1, 2, 0).float()
    return Image.fromarray(((y + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())


@dataclass(frozen=True)
class CodecTrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    latent_noise: float = 0.2  # std of the noise added to latents while training (robust decoding)
    latent_l2: float = 1e-3  # keeps latents near unit scale so the noise above means something
    seed: int = 0
    log_every: int = 500


def train_codec(
    codec: ToyCodec, pixels: torch.Tensor, cfg: CodecTrainConfig, log: Callable[[str], None] = print
) -> dict[str, float]:
    """Train ``codec`` in place on (N, 3, H, W) pixels in [-1, 1], then set its scaling so latents
    have zero mean and unit variance (what the flow model expects, as for FLUX's VAE)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    labels = codec.labels(pixels)
    opt = torch.optim.AdamW(codec.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    codec.train().requires_grad_(True)
    t0, window = time.perf_counter(), []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(pixels), (cfg.batch_size,), generator=gen)
        z = codec.encoder(pixels[idx])
        noisy = z + cfg.latent_noise * torch.randn(z.shape, generator=gen)
        loss = F.cross_entropy(codec.logits(noisy), labels[idx]) + cfg.latent_l2 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log(f"codec step {step + 1}/{cfg.steps} loss {sum(window) / len(window):.4f}")
            window = []
    codec.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([codec.encoder(chunk) for chunk in pixels.split(256)])
        accuracy = torch.cat([
            (codec.logits(zc).argmax(1) == lab).float().flatten()
            for zc, lab in zip(z.split(256), labels.split(256), strict=True)
        ]).mean()
    codec.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return {"pixel_accuracy": float(accuracy), "latent_mean": float(z.mean()), "latent_std": float(z.std()),
            "wall_s": round(time.perf_counter() - t0, 1)}
