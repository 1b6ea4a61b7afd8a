"""The toy base model: FLUX's architecture at ~4M parameters, built offline (issue 8, item 2).

Same component set as FLUX.1 (MMDiT transformer, VAE, CLIP for the pooled vector, T5 for the
token sequence), so :class:`~musar.pipelines.pipeline_musar.MusarPipeline`, ``musar train`` and the evaluation code
run on it unchanged. What differs is size, the codec (:class:`~musar.toy.codec.ToyCodec`, a small
learned palette codec) and the tokenizers (one token per word of the world's closed vocabulary).
The codec, both text encoders and the transformer all start random and are trained in
:mod:`musar.toy.pretrain`: there is no pretrained model small enough, and the world's language is tiny.

``guidance_embeds`` is off: the toy model is not guidance-distilled and MusarPipeline does no
classifier-free guidance, so generation is plain conditional sampling.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from musar.data.samples import DIPTYCH_TEMPLATE
from musar.errors import MusarError
from musar.models.transformer import MusarTransformer
from musar.pipelines.pipeline_musar import MusarPipeline
from musar.toy import world
from musar.toy.codec import ToyCodec
from musar.utils.registry import PresetSpec
from musar.utils.tokenizer import word_level_tokenizer

# Where the shipped weights live (package data) and what they are called.
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toy"
SHIPPED_BASE = ASSETS / "base"
SHIPPED_LORA = ASSETS / "musar_lora.safetensors"


@dataclass(frozen=True)
class ToySizes:
    """Sizes of the toy base. hidden = heads * head_dim = 192; RoPE axes sum to head_dim.

    A packed token (4 x 16 latent channels = 64 values) is a third of the hidden width, so the
    residual stream has room for more than the token itself. With 192 raw pixel values per token
    it had none, and the model learned far too slowly (see :mod:`musar.toy.codec`).
    """

    image_size: int = 64
    codec_levels: int = 3  # down-sampling 2**(3-1) = 4: 64 px -> 16x16 latents -> 64 tokens
    latent_channels: int = 16  # FLUX's VAE has 16 too
    codec_width: int = 64
    heads: int = 6
    head_dim: int = 32
    rope_axes: tuple[int, int, int] = (8, 12, 12)
    double_blocks: int = 2
    single_blocks: int = 2
    t5_width: int = 64
    t5_layers: int = 2
    clip_width: int = 32
    t5_max_length: int = 128  # diptych prompts are ~60 words; captions ~25
    clip_max_length: int = 48  # the pooled vector; FLUX truncates CLIP's input too


def vocabulary() -> list[str]:
    """Every word the world's captions, subject phrases and the diptych template use."""
    words = set(world.PALETTE) | set(world.SHAPES) | set(world.PATTERNS) | set(world.TEXTURES)
    for region in world.REGIONS:
        words |= set(world.where(region).split())
    words |= {"a", "an", "with", "and", "on", "background", "empty", "scene", "another", "the", "same", ",", ".", ":"}
    template = DIPTYCH_TEMPLATE.format(phrase_a="x", desc_a="x", phrase_b="x", desc_b="x")
    words |= set(template.replace(",", " ").replace(".", " ").replace(":", " ").lower().split())
    return sorted(words)


def build_toy_pipeline(seed: int = 0, sizes: ToySizes | None = None) -> MusarPipeline:
    """A randomly initialised toy base, deterministic in ``seed`` (pretraining starts here)."""
    s = sizes or ToySizes()
    if sum(s.rope_axes) != s.head_dim:
        raise MusarError(f"RoPE axes {s.rope_axes} must sum to the head dim {s.head_dim}")
    words = vocabulary()
    tokenizer = word_level_tokenizer(words, model_max_length=s.clip_max_length)
    tokenizer_2 = word_level_tokenizer(words, model_max_length=s.t5_max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        codec = ToyCodec(
            palette=tuple(world.PALETTE.values()), latent_channels=s.latent_channels, width=s.codec_width,
            block_out_channels=(1,) * s.codec_levels,
        )
        transformer = MusarTransformer(
            patch_size=1,
            in_channels=4 * s.latent_channels,
            num_layers=s.double_blocks,
            num_single_layers=s.single_blocks,
            attention_head_dim=s.head_dim,
            num_attention_heads=s.heads,
            joint_attention_dim=s.t5_width,
            pooled_projection_dim=s.clip_width,
            guidance_embeds=False,
            axes_dims_rope=s.rope_axes,
        )
        zero_init_modulation(transformer)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=s.clip_width, intermediate_size=2 * s.clip_width,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=s.clip_max_length,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.eos_token_id,
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2), d_model=s.t5_width, d_kv=16, d_ff=2 * s.t5_width,
                num_layers=s.t5_layers, num_heads=4, relative_attention_num_buckets=16,
                pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=0, dropout_rate=0.0,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096
    )
    return MusarPipeline(
        scheduler=scheduler, vae=codec, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, transformer=transformer.eval(),
    )


def zero_init_modulation(transformer: MusarTransformer) -> None:
    """DiT's adaLN-Zero: zero the modulation layers (so every block starts as the identity) and the
    output projection (so the first prediction is 0). diffusers initialises FLUX for loading
    pretrained weights, not for training from scratch, where this starts much better behaved."""
    layers = [transformer.norm_out.linear, transformer.proj_out]
    layers += [m for b in transformer.transformer_blocks for m in (b.norm1.linear, b.norm1_context.linear)]
    layers += [b.norm.linear for b in transformer.single_transformer_blocks]
    for layer in layers:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


@contextmanager
def _no_load_bars() -> Iterator[None]:
    """diffusers' and transformers' loading bars, off while a toy folder loads: it takes
    milliseconds, and the bars would bury the demo's verdict. Restored afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def load_toy_pipeline(
    base: str | os.PathLike[str] | None = None, lora: str | os.PathLike[str] | None = None, use_shipped_lora: bool = True
) -> MusarPipeline:
    """A trained toy base folder (default: the shipped one) with a MUSAR LoRA (default: shipped).

    ``lora=None`` with ``use_shipped_lora`` loads the shipped full-MUSAR LoRA when the base is the
    shipped one; a base from elsewhere gets no LoRA unless one is named.
    """
    import musar.toy.codec  # noqa: F401  (diffusers resolves the codec class from sys.modules)

    folder = Path(base) if base is not None else SHIPPED_BASE
    if not (folder / "model_index.json").is_file():
        raise MusarError(
            f"no toy base model at {folder}; build one with `musar toy pretrain --out runs/toy` "
            "(the shipped weights come with the package)"
        )
    with _no_load_bars():
        pipe = MusarPipeline.from_pretrained(folder, dtype=torch.float32)
    if lora is None and use_shipped_lora and base is None and SHIPPED_LORA.is_file():
        lora = SHIPPED_LORA
    if lora is not None:
        pipe.load_lora(lora)
    return pipe


def parameter_counts(pipe: MusarPipeline) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("transformer", "text_encoder", "text_encoder_2", "vae")
    }


# Registered as the ``toy`` preset through the ``musar.presets`` entry point (pyproject.toml).
def _toy_preset() -> PresetSpec:
    """The preset with the toy world's generation defaults (those of musar.toy.cases: 64 px,
    16 steps, 64 px references, 8 phrase tokens, 64 prompt tokens). Guidance stays FLUX's: the
    toy base has no guidance embedding, so the value is recorded but changes nothing."""
    from musar.pipelines.presets import GenerationDefaults, GenerationPreset
    from musar.toy.cases import GEN_DEFAULTS, IMAGE_SIZE

    return GenerationPreset(
        "toy", "the miniature world's trained base with the shipped full MUSAR LoRA (docs/toy.md)",
        lambda with_default_lora: load_toy_pipeline(use_shipped_lora=with_default_lora),
        generation=GenerationDefaults(
            height=IMAGE_SIZE, width=IMAGE_SIZE, steps=GEN_DEFAULTS["num_inference_steps"],
            condition_size=GEN_DEFAULTS["condition_size"], phrase_tokens=GEN_DEFAULTS["phrase_tokens"],
            max_sequence_length=GEN_DEFAULTS["max_sequence_length"],
        ),
    )


TOY = _toy_preset()
