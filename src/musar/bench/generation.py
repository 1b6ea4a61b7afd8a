"""End-to-end generation and quantised loading at FLUX.1-dev's size, with random weights.

Speed and memory do not depend on trained weights, so the whole FLUX.1-dev pipeline (12B
transformer, T5-XXL, CLIP-L, the 16-channel VAE) is built from its configs on the device with
random weights and offline word-level tokenizers: nothing is downloaded. The quantised rows load
that pipeline through the real ``--quantize`` path (:func:`musar.pipelines.presets.load_pipeline`)
from a folder it was saved to, RAM-backed where /dev/shm has room.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from musar.bench.attention import time_call
from musar.bench.forward import bench_inputs, build_random_model
from musar.bench.settings import FLUX_DEV_CONFIG, TINY_CONFIG, Settings
from musar.errors import MusarError
from musar.pipelines.pipeline_musar import MusarPipeline
from musar.pipelines.quantization_spec import QuantizeSpec
from musar.pipelines.weight_stats import weight_bytes
from musar.utils.tokenizer import word_level_tokenizer

PROMPT = "a photo of a corgi and a red backpack on a beach at sunset"
PHRASES = ("a corgi", "a red backpack")
FLUX_T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu")
FLUX_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                      base_shift=0.5, max_shift=1.15)
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


@dataclass(frozen=True)
class PipelineConfigs:
    """The configs of every component of a FLUX pipeline."""

    transformer: dict[str, Any]
    t5: dict[str, Any]
    clip: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(FLUX_SCHEDULER))


FLUX_DEV = PipelineConfigs(FLUX_DEV_CONFIG, FLUX_T5, FLUX_CLIP, FLUX_VAE)
# The same architecture at toy size (the dry run): widths tie as in FLUX (T5 width = joint
# attention width, CLIP width = pooled width, VAE latent channels = transformer channels / 4).
TINY = PipelineConfigs(
    TINY_CONFIG,
    dict(FLUX_T5, vocab_size=64, d_model=TINY_CONFIG["joint_attention_dim"], d_kv=8, d_ff=32, num_layers=1, num_heads=2,
         relative_attention_num_buckets=8),
    dict(FLUX_CLIP, vocab_size=64, hidden_size=TINY_CONFIG["pooled_projection_dim"], intermediate_size=32,
         num_hidden_layers=1, num_attention_heads=2, projection_dim=TINY_CONFIG["pooled_projection_dim"]),
    dict(FLUX_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=TINY_CONFIG["in_channels"] // 4,
         norm_num_groups=4, sample_size=64),
)


def random_flux_pipeline(device: torch.device, dtype: torch.dtype, configs: PipelineConfigs = FLUX_DEV, seed: int = 0) -> MusarPipeline:
    """FLUX.1-dev's architecture (or ``configs``), every component random, built on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    words = f"{PROMPT} {' '.join(PHRASES)}".split()
    tokenizer, tokenizer_2 = word_level_tokenizer(words, 77), word_level_tokenizer(words, 512)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    transformer = build_random_model(configs.transformer, device, dtype, seed)
    torch.manual_seed(seed)
    # Built in float32 on the device and cast: the encoders' own initialisers, seconds on a GPU.
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs.clip, bos_token_id=tokenizer.eos_token_id, **ids))
        text_encoder_2 = T5EncoderModel(T5Config(**configs.t5, decoder_start_token_id=0, **ids))
        vae = AutoencoderKL(**configs.vae)
    return MusarPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**configs.scheduler), vae=vae.to(dtype).eval(),
        text_encoder=text_encoder.to(dtype).eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.to(dtype).eval(),
        tokenizer_2=tokenizer_2, transformer=transformer,
    )


def subjects(size: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()), phrase)
        for phrase in PHRASES
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gib(n: float | None) -> float | None:
    return None if n is None else n / 2**30


def timed_generation(pipe: MusarPipeline, device: torch.device, height: int, width: int, cond: int, steps: int) -> dict[str, Any]:
    """One synchronised generation with c = 2: wall seconds, phase timings and peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    result = pipe(prompt=PROMPT, subjects=subjects(cond), height=height, width=width, num_inference_steps=steps,
                  condition_size=cond, generator=torch.Generator().manual_seed(0), progress=False)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"steps": steps, "seconds": seconds, **{k: round(v, 4) for k, v in result.timings.items()},
            "peak_gib": _gib(peak), "peak_gb": None if peak is None else peak / 1e9}


def component_gib(pipe: MusarPipeline) -> dict[str, float]:
    return {name: weight_bytes(getattr(pipe, name)) / 2**30 for name in COMPONENTS}


def save_pipeline(pipe: MusarPipeline, scratch: Path) -> dict[str, Any]:
    """``pipe`` saved as ``scratch/pipeline``, renamed into place only once complete."""
    t0 = time.perf_counter()
    folder, partial = scratch / "pipeline", scratch / "pipeline.partial"
    pipe.save_pretrained(partial)
    partial.rename(folder)
    return {"folder": str(folder), "save_s": time.perf_counter() - t0}


def quantized_row(
    folder: Path, mode: str, device: torch.device, settings: Settings, steps: int, gguf_dir: Path, last: bool = False
) -> dict[str, Any]:
    """One quantisation mode through ``load_pipeline``: memory per component, one transformer
    forward at c = 2 (time and peak) and a short generation (pipeline peak, VAE decode included).
    ``last``: no mode follows, so ``gguf`` may delete the transformer's safetensors as it encodes
    them (the GGUF replaces them; scratch space stays at one copy of the weights)."""
    from musar.models.options import RoutingOptions
    from musar.pipelines.presets import load_pipeline

    row: dict[str, Any] = {"mode": mode}
    spec = mode
    try:
        QuantizeSpec(mode).check_backend(str(device))  # type: ignore[arg-type]
        if mode == "gguf":
            row["gguf_write_s"], path = write_transformer_gguf(folder, gguf_dir, device, consume=last)
            spec = f"gguf:{path}"
        QuantizeSpec.parse(spec).check(str(device))
    except MusarError as e:
        return {**row, "status": "skipped", "reason": str(e)}
    dtype = "bf16" if settings.dtype == torch.bfloat16 else "fp32"
    t0 = time.perf_counter()
    pipe = load_pipeline(model=folder, quantize=spec, dtype=dtype, device=str(device))
    sync(device)
    row["load_s"] = time.perf_counter() - t0
    row["weights_gib"] = component_gib(pipe)
    row["allocated_gib"] = _gib(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    model = pipe.transformer
    base, cond = bench_inputs(model, settings, 2)
    with torch.no_grad():
        t = time_call(lambda: model(**base, conditions=cond, routing=RoutingOptions(), return_dict=False),
                      device, warmup=settings.warmup, repeats=settings.repeats)
    row.update({f"forward_{k}": v for k, v in t.spread().items()}, forward_peak_gib=_gib(t.peak_mib and t.peak_mib * 2**20))
    row["generate"] = timed_generation(pipe, device, settings.height, settings.width, settings.cond_size, steps)
    row["status"] = "ok"
    return row  # the caller releases the memory once this frame (and the pipeline) is gone


def write_transformer_gguf(folder: Path, out_dir: Path, device: torch.device, consume: bool = False) -> tuple[float, Path]:
    """The saved transformer as a Q8_0 GGUF file (encoded on ``device``); ``consume`` deletes each
    safetensors shard once it is read."""
    from safetensors import safe_open

    from musar.pipelines.gguf import write_gguf

    t0 = time.perf_counter()
    shards = sorted((folder / "transformer").glob("*.safetensors"))

    def tensors() -> Any:
        for shard in shards:
            with safe_open(str(shard), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield key, f.get_tensor(key)
            if consume:
                shard.unlink()

    path = write_gguf(tensors(), out_dir / "transformer-Q8_0.gguf")
    return time.perf_counter() - t0, path


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

