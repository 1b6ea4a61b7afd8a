"""``MusarPipeline``: prompt + N (reference image, subject phrase) pairs -> one image.

A subclass of diffusers' ``FluxPipeline``: it reuses FLUX's prompt encoding (T5 + CLIP), latent
preparation and packing, the resolution-dependent timestep shift, the VAE and the offloading
machinery, and adds only what MUSAR needs — reference conditions, subject spans, routing and the
branch LoRA.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps
from PIL import Image

from musar.errors import MusarError, hub_failure
from musar.models.boxes import box_candidates, check_boxes
from musar.models.options import RoutingOptions
from musar.models.transformer import ConditionInputs, MusarTransformer
from musar.pipelines.conditions import encode_references
from musar.pipelines.lora_loading import MusarLoraLoaderMixin
from musar.pipelines.model_folder import check_model_folder
from musar.pipelines.pipeline_output import MusarPipelineOutput
from musar.pipelines.routing_maps import RoutingRecorder
from musar.pipelines.step_callbacks import StepCallback, callback_inputs, run_step_callback
from musar.utils.images import Fit, load_reference
from musar.utils.io import atomic_write_json
from musar.utils.registry import import_registered_components
from musar.utils.spans import find_subject_spans, spans_tensor
from musar.utils.validation import check_generation

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"


def split_quantization_config(config: Any) -> tuple[Any, Any]:
    """``quantization_config=`` of :meth:`MusarPipeline.from_pretrained` -> (the transformer's
    config, the pipeline config diffusers applies to the other components).

    MusarPipeline loads its transformer itself (as a MusarTransformer), so a pipeline-level config
    must be resolved for it here; a model-level diffusers config means the transformer alone.
    """
    if config is None:
        return None, None
    from diffusers import PipelineQuantizationConfig
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    if isinstance(config, PipelineQuantizationConfig):
        # diffusers' own resolution (quant_mapping or quant_backend + components_to_quantize)
        return config._resolve_quant_config(is_diffusers=True, module_name="transformer"), config
    if isinstance(config, QuantizationConfigMixin):
        return config, None
    raise MusarError(
        f"quantization_config must be a diffusers quantisation config or PipelineQuantizationConfig, got {type(config).__name__}"
    )


Subject = tuple[Image.Image | str | os.PathLike[str], str]


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """One line instead of silent garbage when ``tensor`` holds NaN or infinity."""
    if not bool(torch.isfinite(tensor).all()):
        raise MusarError(
            f"{what} contain NaN/inf; the weights (a LoRA, a quantisation) or the settings overflowed "
            f"{str(tensor.dtype).removeprefix('torch.')}; nothing was written"
        )


class MusarPipeline(MusarLoraLoaderMixin, FluxPipeline):
    """FLUX.1 with MUSAR multi-subject conditioning. See ``__call__``; LoRAs: ``load_lora_weights``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, **kwargs: Any) -> MusarPipeline:
        """Load FLUX components from a hub id or a local folder; the transformer as MusarTransformer.

        ``quantization_config``: a diffusers config (the transformer alone) or a
        ``PipelineQuantizationConfig`` (also T5 etc.), see :mod:`musar.pipelines.quantization`.
        """
        # A local folder's index and configs are judged before anything is imported or allocated.
        check_model_folder(pretrained_model_name_or_path)
        import_registered_components(pretrained_model_name_or_path)
        transformer_quant, kwargs["quantization_config"] = split_quantization_config(kwargs.pop("quantization_config", None))
        transformer_kwargs = {k: v for k, v in (("quantization_config", transformer_quant), ("device_map", kwargs.get("device_map"))) if v}
        # diffusers' current keyword is `dtype` (`torch_dtype` is deprecated); accept both and hand
        # it to every component, the MUSAR transformer included. As in diffusers, a dict gives
        # components their own dtypes ({"transformer": torch.bfloat16, "default": torch.float32}).
        torch_dtype = kwargs.pop("torch_dtype", None)
        dtype = kwargs.pop("dtype", None)
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise MusarError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass only dtype")
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None:
            kwargs["dtype"] = dtype
        if isinstance(dtype, dict):
            transformer_kwargs["dtype"] = dtype.get("transformer", dtype.get("default", torch.float32))
        elif dtype is not None:
            transformer_kwargs["dtype"] = dtype
        try:
            if "transformer" not in kwargs:
                kwargs["transformer"] = MusarTransformer.from_pretrained(
                    pretrained_model_name_or_path, subfolder="transformer", **transformer_kwargs
                )
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError) as e:
            hub = hub_failure(e)  # gated, unknown or uncached: the line names the cure
            if hub is not None:
                raise MusarError(hub) from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MusarError(f"cannot load model {str(pretrained_model_name_or_path)!r}: {first}") from None

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Save as a *plain* FLUX folder (diffusers class names), loadable by FluxPipeline too.

        MUSAR adds no weights to the base model (the LoRA is saved separately), so the folder says
        FluxPipeline / FluxTransformer2DModel and MusarPipeline.from_pretrained reads it back.
        """
        super().save_pretrained(save_directory, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = "FluxPipeline"
        index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
        atomic_write_json(index_path, index)
        config_path = Path(save_directory) / "transformer" / "config.json"
        config = json.loads(config_path.read_text())
        config["_class_name"] = "FluxTransformer2DModel"
        atomic_write_json(config_path, config)

    # -- the steps generation, training and the toy share: one implementation each -------------

    def encode_image_latents(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Packed transformer tokens (B, n, C) of pixels in [-1, 1] (B, 3, H, W): VAE-encoded
        (the posterior mode, or a sample from ``generator``), shifted, scaled and 2x2-packed."""
        vae = self.vae
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = dist.sample(generator) if generator is not None else dist.mode()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        b, ch, h, w = latents.shape
        return self._pack_latents(latents, b, ch, h, w)

    def decode_image_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, height, width) of packed tokens: the inverse of
        :meth:`encode_image_latents` up to the VAE's own loss."""
        unpacked = self._unpack_latents(latents, height, width, self.vae_scale_factor)
        unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(unpacked.to(self.vae.dtype), return_dict=False)[0]

    def flow_timesteps(self, num_inference_steps: int, image_tokens: int, device: torch.device | str) -> torch.Tensor:
        """FLUX's schedule: linear sigmas from 1 to 1/steps, shifted for ``image_tokens`` tokens."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        sched = self.scheduler.config
        mu = calculate_shift(image_tokens, sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096),
                             sched.get("base_shift", 0.5), sched.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return timesteps

    def _encode_phrases(self, phrases: Sequence[str], length: int, device: torch.device) -> list[torch.Tensor]:
        # FLUX encodes text padded to a fixed length without an attention mask; phrases the same.
        return [self._get_t5_prompt_embeds(prompt=p, max_sequence_length=length, device=device) for p in phrases]

    def text_to_image(self, prompt: str | list[str] | None = None, progress: bool = True, **kwargs: Any) -> Any:
        """No references: diffusers' own ``FluxPipeline.__call__`` on these components (its
        arguments, its output), so MUSAR's text-to-image *is* FLUX's; ``progress=False`` hides the
        step bar."""
        self.set_progress_bar_config(disable=not progress)
        return FluxPipeline.__call__(self, prompt=prompt, **kwargs)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str,
        subjects: Sequence[Subject],
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        condition_size: int = 512,
        condition_fit: Fit = "pad",
        phrase_tokens: int = 32,
        max_sequence_length: int = 512,
        condition_timestep: float = 0.0,
        dynamic_routing: bool = True,
        static_routing: bool = True,
        attention: str = "auto",
        independent_conditions: bool = False,
        routing: RoutingOptions | None = None,
        return_routing: bool = False,
        boxes: Sequence[Sequence[float] | None] | None = None,
        outside_boxes: str = "all",
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = True,
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> MusarPipelineOutput | tuple[Any]:
        """Generate an image showing every subject.

        Args:
            prompt: the main prompt; it must contain every subject phrase.
            subjects: ``[(image, phrase), ...]``, N >= 1. ``image`` is a PIL image or a path.
            condition_size / condition_fit: references become ``condition_size`` squares, padded
                (default) or centre-cropped.
            phrase_tokens: T5 tokens per subject phrase (m').
            condition_timestep: t_cond for the conditions' AdaLN modulation (0 = clean).
            dynamic_routing / static_routing / attention: routing switches, ignored when a full
                ``routing`` (:class:`RoutingOptions`) is given. ``attention="auto"``: FlexAttention
                on CUDA, the ``fast`` grouped-SDPA backend elsewhere.
            independent_conditions: conditions never see NOISE (only for weights trained so); their
                K/V are then computed once and cached for every step.
            return_routing: also return S* and routes per step (for routing maps).
            boxes: layout control, one ``(x0, y0, x1, y1)`` in fractions of the image, or None,
                per subject (:mod:`musar.models.boxes` has the rules). A token whose centre is in
                one box reads only that subject's reference; in several, S* picks among them.
            outside_boxes: what tokens outside every box read: ``"all"`` (S* picks among all
                subjects, default) or ``"none"`` (no reference). A single boxed subject is read
                only inside its box either way. Boxes act where dynamic routing acts.
            generator: one generator, or one per image (``num_images_per_prompt`` of them).
            return_dict: False returns ``(images,)`` as diffusers pipelines do.
            callback_on_step_end: ``f(pipe, step, timestep, tensors) -> dict`` after every step, as
                in ``FluxPipeline``; ``tensors`` holds ``callback_on_step_end_tensor_inputs``
                (``latents``, ``prompt_embeds``) and a returned tensor replaces it. Setting
                ``pipe._interrupt = True`` skips the remaining steps.
        """
        t0 = time.perf_counter()
        if not isinstance(prompt, str) or not prompt.strip():
            raise MusarError("the prompt is empty")
        if len(subjects) < 1:
            raise MusarError("give at least one subject (reference image and phrase)")
        check_generation(height=height, width=width, steps=num_inference_steps, guidance=guidance_scale,
                         condition_size=condition_size)
        if isinstance(generator, list) and len(generator) != num_images_per_prompt:
            raise MusarError(f"got {len(generator)} generators for {num_images_per_prompt} images; give one per image")
        step_inputs = callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        routing = routing or RoutingOptions(
            dynamic=dynamic_routing, static=static_routing, backend=attention,  # type: ignore[arg-type]
            independent_conditions=independent_conditions,
        )
        token_px = 2 * self.vae_scale_factor  # VAE factor x the 2x2 packing
        boxes = check_boxes(
            boxes, len(subjects), height, width, dynamic_routing=routing.dynamic, outside=outside_boxes, token_px=token_px
        )
        grid = (height // token_px, width // token_px)
        images = [load_reference(img, condition_size, condition_fit) for img, _ in subjects]
        phrases = [phrase for _, phrase in subjects]
        spans = find_subject_spans(prompt, phrases, self.tokenizer_2, max_sequence_length)

        device = self._execution_device
        batch = num_images_per_prompt
        prompt_embeds, pooled, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=batch, max_sequence_length=max_sequence_length
        )
        dtype = prompt_embeds.dtype
        refs = encode_references(self, images, condition_size, batch, device, dtype)
        phrase_embeds = [e.expand(batch, -1, -1) for e in self._encode_phrases(phrases, phrase_tokens, device)]
        candidates = None
        if boxes is not None and (outside_boxes != "all" or any(b is not None for b in boxes)):
            candidates = box_candidates(boxes, grid, outside_boxes)[None].expand(batch, -1, -1).to(device)
        conditions = ConditionInputs(
            image_latents=[r.latents for r in refs],
            text_embeds=phrase_embeds,
            image_ids=[r.ids for r in refs],
            spans=spans_tensor([spans] * batch, device=device),
            timestep=condition_timestep,
            candidates=candidates,
        )
        t_encode = time.perf_counter()

        latents, image_ids = self.prepare_latents(
            batch, self.transformer.config.in_channels // 4, height, width, dtype, device, generator, latents
        )
        timesteps = self.flow_timesteps(num_inference_steps, latents.shape[1], device)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=device, dtype=torch.float32)
        recorder = RoutingRecorder() if return_routing else None
        cache = None
        if routing.independent_conditions:  # condition K/V do not change across steps: compute once
            cache = self.transformer.build_condition_cache(conditions, pooled, guidance, routing)

        self.scheduler.set_begin_index(0)
        self.set_progress_bar_config(disable=not progress)
        self._num_timesteps, self._interrupt, self._guidance_scale = len(timesteps), False, guidance_scale
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                velocity = self.transformer(
                    hidden_states=latents,
                    encoder_hidden_states=prompt_embeds,
                    pooled_projections=pooled,
                    timestep=(t / 1000).expand(batch).to(latents.dtype),
                    img_ids=image_ids,
                    txt_ids=text_ids,
                    guidance=guidance,
                    conditions=None if cache is not None else conditions,
                    routing=routing,
                    step_index=i,
                    capture=recorder,
                    condition_cache=cache,
                ).sample
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    state = run_step_callback(
                        self, callback_on_step_end, step_inputs, i, t, {"latents": latents, "prompt_embeds": prompt_embeds}
                    )
                    latents, prompt_embeds = state["latents"], state["prompt_embeds"]
                bar.update()
        self._current_timestep = None
        t_denoise = time.perf_counter()

        try:
            # A NaN/inf would become a black or clipped image that looks like a result: refuse it
            # before anything is decoded or returned, so no caller can save it.
            check_finite(latents, "the denoised latents")
            if output_type == "latent":
                out_images: Any = latents
            else:
                decoded = self.decode_image_latents(latents, height, width)
                check_finite(decoded, "the decoded pixels")
                out_images = self.image_processor.postprocess(decoded, output_type=output_type)
        finally:
            self.maybe_free_model_hooks()
        timings = {"encode_s": t_encode - t0, "denoise_s": t_denoise - t_encode, "total_s": time.perf_counter() - t0}
        if not return_dict:
            return (out_images,)
        return MusarPipelineOutput(images=out_images, routing=recorder, grid=grid, timings=timings, boxes=boxes)
