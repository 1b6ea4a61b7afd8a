"""The checks that need the model, run after the argument checks and before any weight loads.

:mod:`musar.cli.args` checks each argument on its own (files, headers, bounds). What is left
depends on the model the run will use, and :mod:`musar.pipelines.preload` knows that model from
its configs and tokenizer without loading it:

* every subject phrase is found by the pipeline's own span check with the model's T5 tokenizer
  (whole words, no two subjects on one token, none cut off past the prompt's token limit);
* a ``--lora`` file fits the transformer's config (keys, widths, block counts), from its header;
* a ``--quantize gguf:PATH`` file is a complete GGUF file of a transformer of that shape;
* the run fits in memory (:mod:`musar.utils.memory`): refused only when clearly impossible.

``musar generate`` and ``musar eval`` call :func:`check_generation_run`, ``musar train``
:func:`check_training_memory`. Each failure is one MusarError line (exit 2).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from musar.pipelines.preload import ModelFacts
from musar.utils import memory
from musar.utils.memory import REFUSE_RATIO, check_fits, estimate_generation, estimate_training


def default_device() -> str:
    """Where ``load_pipeline`` and the trainer put the model: the (local rank's) GPU, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"


def check_lora(facts: ModelFacts, lora: str | os.PathLike[str] | None) -> None:
    """A ``--lora`` file that does not fit the model's transformer is refused before it loads."""
    from musar.lora.fit import check_lora_fits

    if lora is not None and facts.transformer is not None:
        check_lora_fits(lora, facts.transformer, f"{facts.name}, transformer config")


def check_gguf(facts: ModelFacts, quantize: str) -> int | None:
    """The GGUF file of ``--quantize gguf:PATH``: whole, and of the model's shape. Its size in bytes."""
    from musar.pipelines.gguf import check_gguf_fits, read_gguf_header
    from musar.pipelines.quantization_spec import GGUF_PREFIX

    if not quantize.startswith(GGUF_PREFIX):
        return None
    path = quantize[len(GGUF_PREFIX):]
    header = read_gguf_header(path)
    if facts.transformer is not None:
        check_gguf_fits(header, facts.transformer, path, facts.name)
    return header.file_bytes


def _cure(device: str, weights_too_big: bool, lower: str, offload: bool) -> str:
    if weights_too_big:
        if device.startswith("cuda"):
            return ("the weights alone do not fit: use " + ("--offload model or sequential, or " if offload else "")
                    + "--quantize nf4 or int8wo")
        return "the weights alone do not fit: use --quantize int8wo (1 byte a weight) or a machine with more memory"
    text = f"lower {lower}"
    return text + (" or use --offload sequential" if offload and device.startswith("cuda") else "")


def check_generation_run(
    facts: ModelFacts, *, prompts: Sequence[tuple[str, Sequence[str]]] = (), height: int, width: int, refs: int,
    condition_size: int, prompt_tokens: int, phrase_tokens: int, dtype: str, quantize: str = "none",
    offload: str = "none", lora: str | os.PathLike[str] | None = None, lower: str = "--height/--width",
    span_cure: str = "shorten the prompt or raise --max-sequence-length", offload_flag: bool = True,
    device: str | None = None, free: Callable[[str], int | None] | None = None,
) -> None:
    """Every model-dependent check of a generation run (``prompts``: (prompt, phrases) pairs whose
    spans are already known to be fine need not be given), before any weight loads."""
    from musar.pipelines.preload import check_spans

    for prompt, phrases in prompts:
        check_spans(facts, prompt, phrases, prompt_tokens, span_cure)
    check_lora(facts, lora)
    gguf_bytes = check_gguf(facts, quantize)
    size = facts.size()
    if size is None:
        return
    device = device or default_device()
    estimate = estimate_generation(
        size, height=height, width=width, refs=refs, condition_size=condition_size, prompt_tokens=prompt_tokens,
        phrase_tokens=phrase_tokens, dtype="fp32" if facts.preset else dtype, quantize=quantize,
        offload=offload if device.startswith("cuda") else "none", gguf_bytes=gguf_bytes,
    )
    free = free or memory.free_bytes  # looked up now, so a test can stand in for the machine
    have = free(device)
    weights_too_big = have is not None and estimate.weights > REFUSE_RATIO * have
    what = f"generating {width}x{height} px with {refs} reference{'s' if refs != 1 else ''} of {condition_size} px"
    check_fits(estimate, device, what, _cure(device, weights_too_big, lower, offload_flag),
               host_cure="use a machine with more RAM, or --quantize nf4 or int8wo", free=free)


def check_training_memory(cfg: Any, device: str | None = None, free: Callable[[str], int | None] | None = None) -> None:
    """The floor of one training step's memory against what the device has free (musar train)."""
    from musar.lora.fit import expected_lora_shapes, flux_linears
    from musar.pipelines.preload import model_facts

    m, d = cfg.model, cfg.data
    facts = model_facts(None if m.preset else m.pretrained, m.preset)
    size = facts.size()
    if size is None or facts.transformer is None:
        return
    try:
        lora_params = sum(a * b for a, b in expected_lora_shapes(cfg.lora, flux_linears(facts.transformer)).values())
    except ValueError:
        return  # targets that match nothing: the trainer words that
    device = device or ("cpu" if m.device == "cpu" else default_device())
    pairs = cfg.curriculum.stage2_steps > 0 or cfg.curriculum.stage3_steps > 0  # diptych targets, two references
    full = "fp32" if facts.preset else None
    autocast = device.startswith("cuda") and m.mixed_precision in ("auto", "bf16")
    estimate = estimate_training(
        size, batch_size=cfg.optim.batch_size, height=d.view_size, width=d.view_size * (2 if pairs else 1),
        refs=2 if pairs else 1, condition_size=d.condition_size, prompt_tokens=d.max_sequence_length,
        phrase_tokens=d.phrase_tokens, lora_params=lora_params, dtype=full or m.dtype,
        encoder_dtype=full or m.encoder_dtype, lora_dtype=m.lora_dtype,
        compute_dtype="bf16" if autocast else (full or m.dtype), gradient_checkpointing=m.gradient_checkpointing,
    )
    cure = "lower optim.batch_size, data.view_size or data.condition_size"
    cure += "" if m.gradient_checkpointing else ", or set model.gradient_checkpointing: true"
    check_fits(estimate, device, f"training with optim.batch_size {cfg.optim.batch_size} at data.view_size "
               f"{d.view_size}", cure, free=free)
