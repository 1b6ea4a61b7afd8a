"""``callback_on_step_end`` as ``FluxPipeline`` runs it: after every scheduler step, with the
tensors named in ``callback_on_step_end_tensor_inputs``; what it returns replaces them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from musar.errors import MusarError

StepCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def callback_inputs(
    callback: StepCallback | PipelineCallback | MultiPipelineCallbacks | None,
    tensor_inputs: Sequence[str],
    allowed: Sequence[str],
) -> list[str]:
    """The tensor names the callback receives (a ``PipelineCallback`` names its own), checked."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = callback.tensor_inputs
    unknown = [k for k in tensor_inputs if k not in allowed]
    if callback is not None and unknown:
        raise MusarError(f"callback_on_step_end_tensor_inputs may name {list(allowed)}, not {unknown}")
    return list(tensor_inputs)


def run_step_callback(
    pipe: Any, callback: StepCallback, names: Sequence[str], step: int, timestep: torch.Tensor,
    state: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Call ``callback(pipe, step, timestep, {name: tensor})``; returns ``state`` with its changes."""
    outputs = callback(pipe, step, timestep, {k: state[k] for k in names}) or {}
    return {k: outputs.pop(k, v) for k, v in state.items()}
