"""``MusarTransformer``: FLUX's transformer with MUSAR conditions, routing and branch LoRA.

It *is* a diffusers ``FluxTransformer2DModel`` (same modules, same config, same
``from_pretrained`` / ``save_pretrained``), with one new forward that

* appends each condition's image latents to the image stream and its phrase embedding to the
  text stream (layout in :mod:`musar.models.layout`),
* modulates condition rows with ``temb(t_cond)`` (t_cond = 0 by default),
* gives condition tokens their own position ids (:func:`~musar.models.forward_inputs.condition_image_ids`),
* threads a :class:`~musar.models.attention.RoutingContext` through every block's attention.

With no conditions it computes exactly what ``FluxTransformer2DModel.forward`` computes, and it
keeps that method's contract: ``joint_attention_kwargs`` (``scale`` scales every LoRA for the call,
as diffusers' ``apply_lora_scale`` does; MUSAR's own inputs may travel in it too) and checkpointing
through ``enable_gradient_checkpointing(gradient_checkpointing_func=...)``. With
``independent_conditions`` the condition rows can be computed once per image
(:meth:`MusarTransformer.build_condition_cache`) and every step then runs only the PROMPT and
NOISE rows (``forward(..., condition_cache=cache)``), see :mod:`musar.models.cache`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

from musar.errors import MusarError
from musar.models.attention import MusarAttnProcessor, RouteRecord, RoutingContext, plain_qkv_projections
from musar.models.blocks import double_block_forward, single_block_forward
from musar.models.cache import ConditionCache

# The forward's inputs live in forward_inputs.py; ConditionInputs and the id grids stay importable
# from here, where the pipeline, training, the benchmarks and the README import them.
from musar.models.forward_inputs import ConditionInputs, check_candidates, split_joint_attention_kwargs
from musar.models.forward_inputs import condition_image_ids as condition_image_ids
from musar.models.forward_inputs import latent_image_ids as latent_image_ids
from musar.models.layout import TokenLayout
from musar.models.options import RoutingOptions
from musar.models.routing import check_spans


class MusarTransformer(FluxTransformer2DModel):
    """FLUX.1 transformer with MUSAR's routed multi-subject conditioning.

    Its attention layers get :class:`MusarAttnProcessor` once, when the model is built (also
    by ``from_pretrained``); a processor set afterwards (``set_attn_processor``) is kept, and
    a forward with conditions then refuses to run unless every layer can route.
    """

    lora_config = None  # set by musar.lora.model.inject_branch_lora
    lora_plan = None
    _compiled_blocks: tuple[Callable[..., Any], Callable[..., Any]] | None = None  # compile_repeated_blocks

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.use_musar_attention()

    # diffusers reads the config keys from the __init__ signature: keep FLUX's.
    __init__.__signature__ = inspect.signature(FluxTransformer2DModel.__init__)  # type: ignore[attr-defined]

    def use_musar_attention(self) -> None:
        """Route every attention layer through MusarAttnProcessor (idempotent).

        Done at construction; call it again after installing other processors. A replaced
        processor's attention backend (``set_attention_backend``) carries over.
        """
        for block in (*self.transformer_blocks, *self.single_transformer_blocks):
            old = block.attn.processor
            if isinstance(old, MusarAttnProcessor):
                continue
            block.attn.set_processor(MusarAttnProcessor().keeping_backend_of(old))

    def check_routing_processors(self) -> None:
        """Conditions need every attention layer to route: refuse rather than ignore them."""
        groups = (("transformer_blocks", self.transformer_blocks), ("single_transformer_blocks", self.single_transformer_blocks))
        for name, blocks in groups:
            for i, block in enumerate(blocks):
                proc = block.attn.processor
                if not isinstance(proc, MusarAttnProcessor):
                    raise MusarError(
                        f"{name}.{i}.attn uses {type(proc).__name__}, which cannot route MUSAR's conditions; "
                        "call transformer.use_musar_attention() first, or pass no conditions"
                    )

    def fuse_qkv_projections(self) -> None:
        """diffusers' ``fuse_qkv_projections``, refused while a LoRA adapts q/k/v.

        The fused ``to_qkv`` / ``to_added_qkv`` are copies of the base weights, so they would
        silently drop such a LoRA (unload it first, after ``fuse_lora`` to keep its effect). The MUSAR processors stay installed:
        they read the fused projections themselves (:class:`MusarAttnProcessor`).
        """
        for name, module in self.named_modules():
            if hasattr(module, "fuse_projections") and not plain_qkv_projections(module):
                raise MusarError(
                    f"{name} has a LoRA on its q/k/v projections, which fused projections would drop; "
                    "unload the LoRA (after fuse_lora() to keep its effect) before fuse_qkv_projections()"
                )
        super().fuse_qkv_projections()

    @contextmanager
    def scaled_loras(self, scale: float) -> Iterator[None]:
        """Scale every LoRA by ``scale`` inside the ``with`` statement, restored on exit (even on error).

        peft LoRAs (loaded through diffusers) are scaled as diffusers' ``apply_lora_scale`` does;
        the MUSAR branch LoRA's weight (``RowPlan.branch_scale``, set by ``set_adapters``) is
        multiplied by the same factor.
        """
        if scale == 1.0:
            yield
            return
        plan = self.lora_plan
        previous = plan.branch_scale if plan is not None else 1.0
        if USE_PEFT_BACKEND:
            scale_lora_layers(self, scale)
        try:
            if plan is not None:
                plan.branch_scale = previous * scale
            yield
        finally:
            if plan is not None:
                plan.branch_scale = previous
            if USE_PEFT_BACKEND:
                unscale_lora_layers(self, scale)

    def compile_repeated_blocks(self, **compile_kwargs: Any) -> None:
        """Regional ``torch.compile``, as diffusers' method of that name: the blocks, not the model.

        diffusers compiles each block's ``forward``; MUSAR runs its blocks through
        :mod:`musar.models.blocks` instead, so this compiles those two functions. Every double
        (single) block shares one compiled graph; the routed attention inside has no graph
        break (``fullgraph=True`` holds; ``auto`` routing is ``flex`` on CUDA, and ``fast``
        routes NOISE rows without a host read under compile). ``compile_kwargs`` go to
        ``torch.compile``. Building a condition cache runs the blocks eagerly (once per image).
        """
        self._compiled_blocks = (
            torch.compile(double_block_forward, **compile_kwargs),
            torch.compile(single_block_forward, **compile_kwargs),
        )

    def _time_embedding(
        self, t: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        t = t.to(dtype) * 1000
        if guidance is None:
            return self.time_text_embed(t, pooled)
        return self.time_text_embed(t, guidance.to(dtype) * 1000, pooled)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        conditions: ConditionInputs | None = None,
        routing: RoutingOptions | None = None,
        step_index: int | None = None,
        capture: Callable[[RouteRecord], None] | None = None,
        return_dict: bool = True,
        condition_cache: ConditionCache | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow for the NOISE tokens.

        The first eight arguments mean what they mean for ``FluxTransformer2DModel.forward``
        (timestep and guidance in [0, 1]); ``joint_attention_kwargs`` may hold ``scale`` (every
        LoRA's weight for this call, see :meth:`scaled_loras`) and any of the MUSAR arguments below
        (each given one way only). ``conditions`` adds the references; ``routing`` picks routing
        options (defaults: the paper's); ``step_index`` is the denoising step (for
        ``RoutingOptions.start_step``; default 0); ``capture`` receives every routing decision.
        ``condition_cache`` (instead of ``conditions``) reads the references' keys/values from
        :meth:`build_condition_cache`; ``routing`` then defaults to the cache's options.
        """
        explicit = {
            "conditions": conditions, "routing": routing, "step_index": step_index,
            "capture": capture, "condition_cache": condition_cache,
        }
        scale, musar = split_joint_attention_kwargs(joint_attention_kwargs, explicit)
        with self.scaled_loras(scale):
            output = self._forward(
                hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance, **musar
            )
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
        timestep: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor | None, *,
        conditions: ConditionInputs | None, routing: RoutingOptions | None, step_index: int | None,
        capture: Callable[[RouteRecord], None] | None, condition_cache: ConditionCache | None,
    ) -> torch.Tensor:
        """:meth:`forward` once its inputs are resolved: the predicted flow of the NOISE tokens."""
        step_index = step_index or 0
        if condition_cache is not None:
            if conditions is not None and conditions.num > 0:
                raise ValueError("pass either conditions or a condition_cache, not both")
            return self._cached_forward(
                hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance, condition_cache, routing, step_index, capture,
            )
        batch = hidden_states.shape[0]
        cond = conditions if conditions is not None and conditions.num > 0 else None
        layout = TokenLayout(
            prompt=encoder_hidden_states.shape[1],
            noise=hidden_states.shape[1],
            cond_image=[x.shape[1] for x in cond.image_latents] if cond else (),
            cond_text=[x.shape[1] for x in cond.text_embeds] if cond else (),
        )
        if self.lora_plan is not None:
            self.lora_plan.set(layout)

        image = torch.cat([hidden_states, *cond.image_latents], dim=1) if cond else hidden_states
        text = torch.cat([encoder_hidden_states, *cond.text_embeds], dim=1) if cond else encoder_hidden_states
        image = self.x_embedder(image)
        text = self.context_embedder(text)

        temb = self._time_embedding(timestep, guidance, pooled_projections, image.dtype)
        temb_cond = None
        if cond:
            t_cond = torch.full((batch,), float(cond.timestep), device=image.device)
            temb_cond = self._time_embedding(t_cond, guidance, pooled_projections, image.dtype)

        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        id_parts = [txt_ids]
        if cond:
            id_parts += [txt_ids.new_zeros(x.shape[1], 3) for x in cond.text_embeds]
        id_parts.append(img_ids)
        if cond:
            id_parts += [ids.to(img_ids) for ids in cond.image_ids]
        rotary = self.pos_embed(torch.cat(id_parts, dim=0))

        candidates = cond.candidates if cond else None
        check_candidates(candidates, batch, layout.noise)
        if cond:
            self._check_condition_inputs(cond.spans, layout.prompt)
        ctx = RoutingContext(
            layout, routing or RoutingOptions(), cond.spans if cond else None, step_index, capture,
            candidates=candidates,
        )
        joint = self._run_blocks(image, text, temb, temb_cond, rotary, layout, ctx)
        return self.proj_out(self.norm_out(joint[:, layout.noise_slice], temb))

    def _run_blocks(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        temb_cond: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        layout: TokenLayout,
        ctx: RoutingContext,
    ) -> torch.Tensor:
        """Every block on the streams; ``layout`` describes the rows the streams hold.

        Without conditions the attention layers are called as FLUX calls them (no routing).
        """
        run = self._maybe_checkpoint
        routed = ctx.layout.num_conditions > 0
        if routed:
            cfg = self.config
            ctx.prepare(image.device, image.dtype, cfg.num_attention_heads, cfg.attention_head_dim)
        double, single = double_block_forward, single_block_forward
        if self._compiled_blocks is not None and not ctx.cache_write:
            double, single = self._compiled_blocks
        for i, block in enumerate(self.transformer_blocks):
            layer = ctx.layer(i) if routed else None
            text, image = run(double, block, image, text, temb, temb_cond, rotary, layout, layer)
            if layer is not None and layer.capturing:
                layer.flush()
        joint = torch.cat([text, image], dim=1)
        offset = len(self.transformer_blocks)
        for j, block in enumerate(self.single_transformer_blocks):
            layer = ctx.layer(offset + j) if routed else None
            joint = run(single, block, joint, temb, temb_cond, rotary, layout, layer)
            if layer is not None and layer.capturing:
                layer.flush()
        return joint

    def _check_condition_inputs(self, spans: torch.Tensor | None, prompt_len: int) -> None:
        self.check_routing_processors()
        # Reading the spans is a host sync, which a compiled forward cannot trace: there the
        # pipeline's spans (found by matching tokens, so in range by construction) are trusted.
        if spans is not None and not torch.compiler.is_compiling():
            check_spans(spans, prompt_len)

    @torch.no_grad()
    def build_condition_cache(
        self,
        conditions: ConditionInputs,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
        routing: RoutingOptions | None = None,
    ) -> ConditionCache:
        """Run the condition rows alone through every block and keep each layer's keys/values.

        Valid only with ``independent_conditions=True`` (the default here): then condition rows
        never see PROMPT or NOISE, so this equals what every step of the full forward computes.
        ``pooled_projections`` and ``guidance`` must be the ones the denoising steps will use.
        """
        self.check_routing_processors()
        options = routing or RoutingOptions(independent_conditions=True)
        cache = ConditionCache(
            cond_image=tuple(x.shape[1] for x in conditions.image_latents),
            cond_text=tuple(x.shape[1] for x in conditions.text_embeds),
            options=options,
            spans=conditions.spans,
            candidates=conditions.candidates,
            pooled_projections=pooled_projections.detach(),
            guidance=None if guidance is None else guidance.detach(),
            timestep=float(conditions.timestep),
        )
        layout = cache.cond_layout
        if self.lora_plan is not None:
            self.lora_plan.set(layout)
        image = self.x_embedder(torch.cat(list(conditions.image_latents), dim=1))
        text = self.context_embedder(torch.cat(list(conditions.text_embeds), dim=1))
        t_cond = torch.full((pooled_projections.shape[0],), cache.timestep, device=image.device)
        temb_cond = self._time_embedding(t_cond, guidance, pooled_projections, image.dtype)
        ids = [conditions.image_ids[0].new_zeros(x.shape[1], 3) for x in conditions.text_embeds]
        rotary = self.pos_embed(torch.cat(ids + [i.to(ids[0]) for i in conditions.image_ids], dim=0))
        ctx = RoutingContext(layout, options, None, cache=cache, cache_write=True)
        self._run_blocks(image, text, temb_cond, temb_cond, rotary, layout, ctx)
        return cache

    def _cached_forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None,
        cache: ConditionCache,
        routing: RoutingOptions | None,
        step_index: int,
        capture: Callable[[RouteRecord], None] | None,
    ) -> torch.Tensor:
        """Only PROMPT and NOISE rows; their attention also reads the cached condition keys."""
        options = routing or cache.options
        cache.check_inputs(pooled_projections, guidance, options)
        if hidden_states.shape[0] != cache.batch:
            raise ValueError(f"the condition cache holds {cache.batch} samples, the batch has {hidden_states.shape[0]}")
        streams = TokenLayout(prompt=encoder_hidden_states.shape[1], noise=hidden_states.shape[1])
        if self.lora_plan is not None:
            self.lora_plan.set(streams)  # no condition rows in the streams: no subject-branch rows
        image = self.x_embedder(hidden_states)
        text = self.context_embedder(encoder_hidden_states)
        temb = self._time_embedding(timestep, guidance, pooled_projections, image.dtype)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        check_candidates(cache.candidates, cache.batch, streams.noise)
        self._check_condition_inputs(cache.spans, streams.prompt)
        ctx = RoutingContext(
            cache.layout(streams.prompt, streams.noise), options, cache.spans, step_index, capture, cache=cache,
            candidates=cache.candidates,
        )
        joint = self._run_blocks(image, text, temb, None, rotary, streams, ctx)
        return self.proj_out(self.norm_out(joint[:, streams.noise_slice], temb))

    def _maybe_checkpoint(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one block function, checkpointed as diffusers' models do when enabled.

        The checkpoint function set by ``enable_gradient_checkpointing`` is called once per block
        with the callable to recompute first, as diffusers calls it with a block (its default
        runs ``fn.__call__(*args)``). Here that callable is MUSAR's block function and the block
        is its first argument, since MUSAR does not run ``block.forward``.
        """
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(fn, *args)
        return fn(*args)
