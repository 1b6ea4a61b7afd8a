"""Ready-made pipelines: the real FLUX.1-dev loader, the tiny random-weight preset, and what a
preset generates by default.

``tiny`` is the FLUX architecture (transformer, VAE, CLIP and T5 text encoders) at a few
thousand parameters with random weights and offline-built tokenizers. It produces noise-like
images; it exists so every code path (CLI, training, evaluation, UI) runs in seconds on a CPU
with nothing downloaded. It says so wherever it is used.

A preset may also say how it generates by default (:class:`GenerationPreset`): the toy model
draws 64x64 images in 16 steps, where FLUX.1's 1024x1024 in 28 would take minutes and draw
nothing it was trained on. ``musar generate`` fills every size, step count and token count not
given on the command line from :func:`generation_defaults`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from musar.errors import MusarError
from musar.models.transformer import MusarTransformer
from musar.pipelines.pipeline_musar import DEFAULT_MODEL, MusarPipeline
from musar.pipelines.quantization import load_quantized_pipeline, quantize_pipeline
from musar.pipelines.quantization_spec import QuantizeSpec
from musar.utils.dtypes import DTYPE_NAMES, torch_dtype
from musar.utils.registry import PresetSpec, get_preset
from musar.utils.tokenizer import word_level_tokenizer

_TINY_CORPUS = [
    "a photo of a dog and a red backpack on the beach",
    "a corgi and a cat sitting on a wooden floor in the snow",
    "a teapot next to a vase with flowers on a table, in the jungle",
    "a plush bear and a robot toy with a city in the background",
    "two images concatenated side by side, the left part is: a sneaker. the right part is: another sneaker",
    "a purple rug in a forest, a mountain, a blue house, a wheat field, a cobblestone street",
]


@dataclass(frozen=True)
class GenerationDefaults:
    """How one generation call runs unless told otherwise; ``None`` = FLUX.1's value.

    The names are ``musar generate``'s flags (``--steps`` is ``num_inference_steps``,
    ``--guidance`` is ``guidance_scale``, ``--max-sequence-length`` the main prompt's T5 tokens).
    """

    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    condition_size: int | None = None
    phrase_tokens: int | None = None
    max_sequence_length: int | None = None

    def over(self, base: GenerationDefaults) -> GenerationDefaults:
        """These values, with ``base``'s where this one says ``None``."""
        return dataclasses.replace(base, **{k: v for k, v in dataclasses.asdict(self).items() if v is not None})


# Flag name -> MusarPipeline.__call__ keyword, where they differ.
GENERATION_KWARGS = {"steps": "num_inference_steps", "guidance": "guidance_scale"}


def _flux_defaults() -> GenerationDefaults:
    """FLUX.1's defaults: MusarPipeline.__call__'s own, read from its signature (one source)."""
    params = inspect.signature(MusarPipeline.__call__).parameters
    return GenerationDefaults(**{
        f.name: params[GENERATION_KWARGS.get(f.name, f.name)].default for f in dataclasses.fields(GenerationDefaults)
    })


FLUX_GENERATION = _flux_defaults()


@dataclass(frozen=True)
class GenerationPreset(PresetSpec):
    """A :class:`PresetSpec` that also says how it generates by default (``None``: FLUX's)."""

    generation: GenerationDefaults = GenerationDefaults()


def generation_defaults(preset: str | None = None) -> GenerationDefaults:
    """Every generation default of ``preset`` (None: the FLUX.1 model), FLUX's where it says none.

    A preset that is a plain :class:`PresetSpec` generates with FLUX's defaults. This imports the
    preset's module, not its weights.
    """
    if preset is None:
        return FLUX_GENERATION
    own = getattr(get_preset(preset), "generation", None)
    return FLUX_GENERATION if own is None else own.over(FLUX_GENERATION)


@dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny preset; heads x head_dim = 32 wide, 4 latent channels, VAE factor 8."""

    joint_attention_dim: int = 32
    pooled_projection_dim: int = 16
    latent_channels: int = 4


def tiny_pipeline(seed: int = 0) -> MusarPipeline:
    """FLUX architecture at toy size, random weights, built offline and deterministically."""
    sizes = TinySizes()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = MusarTransformer(
            patch_size=1,
            in_channels=4 * sizes.latent_channels,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=sizes.joint_attention_dim,
            pooled_projection_dim=sizes.pooled_projection_dim,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=sizes.latent_channels,
            norm_num_groups=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
        # Word-level over a fixed corpus: identical token ids on every build (a trained Unigram
        # model is not), so resumed runs and DDP ranks agree. Unknown words map to <unk>.
        words = re.findall(r"\w+|[^\w\s]", " ".join(_TINY_CORPUS))
        tokenizer = word_level_tokenizer(words, model_max_length=77)
        tokenizer_2 = word_level_tokenizer(words, model_max_length=512)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=sizes.pooled_projection_dim, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2), d_model=sizes.joint_attention_dim, d_kv=8, d_ff=32, num_layers=1,
                num_heads=2, relative_attention_num_buckets=8, pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096)
    return MusarPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, transformer=transformer.eval(),
    )


def load_pipeline(
    model: str | os.PathLike[str] | None = None,
    preset: str | None = None,
    lora: str | os.PathLike[str] | None = None,
    dtype: str = "bf16",
    device: str | None = None,
    offload: str = "none",
    single_lora: bool = False,
    quantize: str | QuantizeSpec = "none",
) -> MusarPipeline:
    """The one factory behind the CLI, evaluation and UI: a ready pipeline on its device.

    ``quantize``: ``none``, ``int8wo``, ``fp8wo``, ``nf4`` or ``gguf:PATH``
    (:mod:`musar.pipelines.quantization_spec`); checked before any model loads.
    """
    if dtype not in DTYPE_NAMES:
        raise MusarError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")
    if preset is not None and model is not None:
        raise MusarError("give either --model or --preset, not both")
    if offload not in ("none", "model", "sequential"):
        raise MusarError(f"unknown offload mode {offload!r}; expected none, model or sequential")
    if offload != "none" and not torch.cuda.is_available():  # before any weight loads
        raise MusarError("--offload needs a CUDA GPU (it moves weights between CPU and GPU)")
    spec = QuantizeSpec.parse(quantize)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec.check(device)
    # Quantised weights are made where they will run (torchao and bitsandbytes quantise on load).
    quant_device = device if spec.enabled and offload == "none" else None
    if preset is not None:
        pipe = get_preset(preset).build(lora is None)  # tiny models run in fp32 on CPU
        if spec.enabled:
            pipe = quantize_pipeline(pipe, spec, quant_device)
    elif spec.enabled:
        pipe = load_quantized_pipeline(model or DEFAULT_MODEL, spec, torch_dtype(dtype), quant_device)
    else:
        pipe = MusarPipeline.from_pretrained(model or DEFAULT_MODEL, dtype=torch_dtype(dtype))
    if lora is not None:
        pipe.load_lora(lora)
    if single_lora:  # the "one LoRA for all tokens" ablation: its weights must have been trained so
        mode = getattr(pipe.transformer.lora_config, "mode", None)
        if mode != "shared":
            raise MusarError(f"the single-lora ablation needs a LoRA trained with mode 'shared' (got {mode})")
    if offload != "none":
        (pipe.enable_model_cpu_offload if offload == "model" else pipe.enable_sequential_cpu_offload)()
    else:
        # Every component is already in its dtype: from_pretrained(dtype=) loaded it so (keeping the
        # modules a model marks float32), presets keep theirs, quantised weights cannot be cast.
        # Casting here again would undo the first and make diffusers warn about it.
        pipe.to(device=device)
    return pipe


TINY = GenerationPreset(
    "tiny", "FLUX architecture at a few thousand parameters, random weights: smoke runs, images are noise",
    lambda with_default_lora: tiny_pipeline(), random_weights=True,
    # FLUX's sizes and step count: the tiny model exists to run FLUX's code paths as FLUX runs them.
    generation=GenerationDefaults(),
)
