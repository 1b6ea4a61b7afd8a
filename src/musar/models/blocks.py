"""FLUX block forwards with per-token-kind AdaLN modulation, composed from diffusers' modules.

FLUX modulates every token of a sample with one timestep embedding. MUSAR's condition tokens
carry their own, ``temb(t_cond)`` (docs/design.md sec. 2), so the norm layers must modulate row groups
differently. These functions are the one place that happens. They only *call* diffusers'
submodules (``norm1``, ``attn``, ``ff``, ...) in FLUX's order; when a stream has no condition
rows they compute exactly what ``FluxTransformerBlock.forward`` /
``FluxSingleTransformerBlock.forward`` compute (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn

from musar.models.attention import LayerRouting
from musar.models.layout import TokenLayout


def modulate(
    norm: nn.Module, x: torch.Tensor, sizes: Sequence[int], embs: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run an AdaLN-Zero ``norm`` on consecutive row groups of ``x``, each with its own embedding.

    Returns the normalised rows and the norm's other outputs (gates, shifts, scales) as per-row
    tensors, (B, 1, D) when one group covers every row (FLUX's own broadcast) or (B, L, D).
    """
    groups = [(g, e) for g, e in zip(x.split(list(sizes), dim=1), embs) if g.shape[1] > 0]
    outs = [norm(g, emb=e) for g, e in groups]
    normed = torch.cat([o[0] for o in outs], dim=1) if len(outs) > 1 else outs[0][0]
    params = []
    for i in range(1, len(outs[0])):
        if len(outs) == 1:
            params.append(outs[0][i][:, None])
        else:
            params.append(torch.cat([o[i][:, None].expand(-1, g.shape[1], -1) for o, (g, _) in zip(outs, groups)], dim=1))
    return normed, params


def _routed(routing: LayerRouting | None) -> dict[str, LayerRouting]:
    # Without routing, call the attention exactly as FLUX does: a processor the user installed
    # (which takes no ``routing``) then runs without diffusers' "unexpected kwargs" warning.
    return {} if routing is None else {"routing": routing}


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def double_block_forward(
    block: FluxTransformerBlock,
    image: torch.Tensor,
    text: torch.Tensor,
    temb: torch.Tensor,
    temb_cond: torch.Tensor | None,
    rotary: tuple[torch.Tensor, torch.Tensor],
    layout: TokenLayout,
    routing: LayerRouting | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One double-stream block. ``image`` = [NOISE | CI...], ``text`` = [PROMPT | CT...]."""
    embs = (temb, temb_cond)
    norm_image, (gate_msa, shift_mlp, scale_mlp, gate_mlp) = modulate(block.norm1, image, layout.image_split, embs)
    norm_text, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = modulate(
        block.norm1_context, text, layout.text_split, embs
    )
    attn_image, attn_text = block.attn(
        hidden_states=norm_image, encoder_hidden_states=norm_text, image_rotary_emb=rotary, **_routed(routing)
    )

    image = image + gate_msa * attn_image
    image = image + gate_mlp * block.ff(block.norm2(image) * (1 + scale_mlp) + shift_mlp)

    text = text + c_gate_msa * attn_text
    text = text + c_gate_mlp * block.ff_context(block.norm2_context(text) * (1 + c_scale_mlp) + c_shift_mlp)
    return _clip_fp16(text), image


def single_block_forward(
    block: FluxSingleTransformerBlock,
    joint: torch.Tensor,
    temb: torch.Tensor,
    temb_cond: torch.Tensor | None,
    rotary: tuple[torch.Tensor, torch.Tensor],
    layout: TokenLayout,
    routing: LayerRouting | None,
) -> torch.Tensor:
    """One single-stream block over the joint sequence [PROMPT | CT... | NOISE | CI...]."""
    embs = (temb, temb_cond, temb, temb_cond)
    norm_joint, (gate,) = modulate(block.norm, joint, layout.joint_split, embs)
    mlp = block.act_mlp(block.proj_mlp(norm_joint))
    attn = block.attn(hidden_states=norm_joint, image_rotary_emb=rotary, **_routed(routing))
    joint = joint + gate * block.proj_out(torch.cat([attn, mlp], dim=2))
    return _clip_fp16(joint)
