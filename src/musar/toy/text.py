"""Pretraining the toy's T5 on text alone, before it meets any image (FLUX's T5 comes pretrained).

FLUX's T5 was pretrained on text and is frozen: its words arrive distinct and contextualised.
The toy's T5 starts random. Trained only through the flow loss, it has to learn, from a weak
gradient, that 'red' in 'a red triangle' is a body colour, in 'with red stripes' a pattern colour
and in 'on a red background' the background. This module gives it the stand-in for text
pretraining: masked-word prediction on the world's own captions and prompts (T5's objective is
span corruption; single masked words suffice for a closed vocabulary of ~60 words). It costs
seconds: the encoder is 70k parameters and captions are 30 tokens.

The masked word is ``<unk>``, which no caption contains. Inputs are padded to the lengths the
base will see, without an attention mask, exactly as FluxPipeline encodes prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, T5EncoderModel


def mlm_pretrain(
    encoder: T5EncoderModel, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], steps: int,
    lengths: Sequence[int] = (32, 64), batch_size: int = 128, lr: float = 3e-3, mask_prob: float = 0.2,
    seed: int = 0, log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train ``encoder`` in place to predict masked words of ``texts``; returns the final loss and
    masked-word accuracy (on the last 10% of steps). The prediction head is dropped afterwards."""
    gen = torch.Generator().manual_seed(seed)
    width, vocab = encoder.config.d_model, len(tokenizer)
    with torch.random.fork_rng(devices=[]):  # the head's init is part of the seed's run too
        torch.manual_seed(seed)
        head = torch.nn.Linear(width, vocab)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, steps), pct_start=0.1)
    specials = torch.tensor([tokenizer.pad_token_id, tokenizer.eos_token_id])
    encoded = {n: tokenizer(list(texts), padding="max_length", max_length=n, truncation=True,
                            return_tensors="pt").input_ids for n in lengths}
    encoder.train().requires_grad_(True)
    t0, tail_loss, tail_acc, tail = time.perf_counter(), 0.0, 0.0, 0
    for step in range(steps):
        ids = encoded[lengths[step % len(lengths)]]
        batch = ids[torch.randint(0, len(ids), (batch_size,), generator=gen)]
        maskable = ~torch.isin(batch, specials)
        masked = maskable & (torch.rand(batch.shape, generator=gen) < mask_prob)
        if not masked.any():
            continue
        inputs = batch.masked_fill(masked, tokenizer.unk_token_id)
        logits = head(encoder(inputs).last_hidden_state)[masked]
        loss = F.cross_entropy(logits, batch[masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail_loss += float(loss.detach())
            tail_acc += float((logits.argmax(-1) == batch[masked]).float().mean())
            tail += 1
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"text mlm step {step + 1}/{steps} loss {float(loss.detach()):.4f}")
    encoder.eval().requires_grad_(False)
    n = max(1, tail)
    return {"loss": tail_loss / n, "masked_accuracy": tail_acc / n, "wall_s": round(time.perf_counter() - t0, 1)}


def freeze_text(encoder: T5EncoderModel, keep: str) -> None:
    """What of the T5 keeps training with the base: 'all', 'layers' (the contextualiser: word
    vectors frozen) or 'none' (frozen, as FLUX's T5 is)."""
    encoder.requires_grad_(keep != "none")
    if keep == "layers":
        encoder.shared.weight.requires_grad_(False)
