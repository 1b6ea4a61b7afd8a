"""One MUSAR training step vs a plain FLUX LoRA step vs concatenation without routing (issue 5).

Full-size FLUX.1-dev architecture with random bf16 weights, gradient checkpointing, batch 1, a
1024x512 diptych target (2048 noise tokens, 512 prompt tokens) and two 512x512 references
(1024 image + 32 phrase tokens each). Three variants on the same weights, in the same run:

* ``plain``  -- a plain FLUX LoRA step: no references, one rank-128 LoRA on every row
  (``mode="shared"``), i.e. what a standard FLUX LoRA fine-tune does;
* ``concat`` -- the same diptych step with both references' tokens (image latents + phrase
  tokens) simply appended to the streams: one unmasked attention, no routing, the same rank-128
  LoRA on every row (docs/design.md sec. 9's "two references concatenated" setting);
* ``musar``  -- the real step: conditions with t_cond modulation, dual-branch LoRA (noise rank 4 on
  noise rows, subject rank 128 on condition rows, none on the prompt), static + dynamic routing
  (``fast`` backend, SDPA restricted to FlashAttention / memory-efficient kernels).

Each step is what ``musar train`` runs per batch after encoding: rectified-flow loss on the noise
tokens, backward, gradient clipping, AdamW. Encoders (VAE, T5, CLIP) are not part of the step.
Printed: seconds per step, peak GPU memory (weights included), ratios against ``plain``, the
MUSAR / concat ratio (target <= 1.1) and model FLOPs utilisation:

  MFU = (FLOPs of forward + backward) / step time / peak;  HFU adds the checkpoint recompute.

FLOPs are counted with ``torch.utils.flop_counter`` on one extra step. Peak throughput is taken
from the GPU name (H100/H200: 989 TFLOP/s dense bf16) or ``--peak-tflops``.

    python -m musar.bench.train_step                              # on a GPU (needs ~40 GB)
    python -m musar.bench.train_step --preset tiny --device cpu   # smoke test, seconds
    python -m musar.bench.train_step --out step.json              # also every timed step, as JSON
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from musar.bench.attention import spread
from musar.bench.forward import build_random_model
from musar.bench.settings import PRESETS, preset_name
from musar.bench.targets import format_targets, judge, train_values
from musar.lora import BranchLoRAConfig, inject_branch_lora, remove_branch_lora
from musar.models.options import RoutingOptions
from musar.models.transformer import ConditionInputs, MusarTransformer, condition_image_ids, latent_image_ids
from musar.train.config import ObjectiveConfig
from musar.train.encoding import EncodedBatch
from musar.train.kernels import sdpa_context
from musar.train.objective import draw_noise, flow_step_loss
from musar.train.setup import select_trainable
from musar.utils.io import atomic_write_json, check_writable

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}  # dense bf16


@dataclass
class Shape:
    height: int  # target pixels
    width: int
    cond: int  # reference side, pixels
    prompt: int  # T5 tokens
    phrase: int  # T5 tokens per subject phrase


# Keyed by the bench presets' names (musar.bench.settings), so every bench command takes the same --preset.
SHAPES = {"flux-dev-random": Shape(512, 1024, 512, 512, 32), "tiny": Shape(64, 128, 64, 32, 8)}


def build_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> MusarTransformer:
    """Random weights made directly on the device (the forward benchmark's builder), in train mode."""
    return build_random_model(config, device, dtype, seed).train()


def make_batch(model: MusarTransformer, shape: Shape, mode: str, device: torch.device, dtype: torch.dtype) -> EncodedBatch:
    """Random encoded inputs. ``concat`` appends the references' tokens to the image and text
    streams as plain tokens (no conditions, so no routing, no per-token modulation: one SDPA
    call over everything), exactly the naive concatenation of docs/design.md sec. 9."""
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(device, dtype)

    c = 0 if mode == "plain" else 2
    grid, cgrid = (shape.height // 16, shape.width // 16), (shape.cond // 16, shape.cond // 16)
    latents = rand(1, math.prod(grid), cfg.in_channels)
    ids = latent_image_ids(*grid, device, dtype)
    prompt = rand(1, shape.prompt, cfg.joint_attention_dim)
    refs = [rand(1, math.prod(cgrid), cfg.in_channels) for _ in range(c)]
    ref_ids = [condition_image_ids(k, *cgrid, device, dtype) for k in range(c)]
    phrases = [rand(1, shape.phrase, cfg.joint_attention_dim) for _ in range(c)]
    if mode == "concat":
        latents, ids, prompt = torch.cat([latents, *refs], 1), torch.cat([ids, *ref_ids]), torch.cat([prompt, *phrases], 1)
        refs, ref_ids, phrases = [], [], []
    spans = torch.tensor([[[2 + 6 * k, 4] for k in range(len(refs))]], device=device) if refs else None
    return EncodedBatch(
        latents=latents, latent_ids=ids, prompt_embeds=prompt, pooled=rand(1, cfg.pooled_projection_dim),
        text_ids=torch.zeros(prompt.shape[1], 3, device=device, dtype=dtype),
        conditions=ConditionInputs(refs, phrases, ref_ids, spans=spans),
    )


@dataclass
class Variant:
    name: str
    lora: BranchLoRAConfig
    routing: RoutingOptions


def variants(rank: int, noise_rank: int) -> list[Variant]:
    shared = BranchLoRAConfig(subject_rank=rank, mode="shared")  # one LoRA on every row, as a plain FLUX LoRA
    return [
        Variant("plain", shared, RoutingOptions(backend="fast")),
        Variant("concat", shared, RoutingOptions(backend="fast")),
        Variant("musar", BranchLoRAConfig(noise_rank=noise_rank, subject_rank=rank), RoutingOptions(backend="fast")),
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(model: MusarTransformer, v: Variant, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inject_branch_lora(model, v.lora)
    params = [p for _, p in select_trainable(model)]
    for p in params:
        p.data = p.data.to({"fp32": torch.float32, "bf16": torch.bfloat16}[args.lora_dtype])
    opt = torch.optim.AdamW(params, lr=1e-5)
    enc = make_batch(model, SHAPES[args.preset], v.name, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with sdpa_context(args.attention, device), autocast:
            t, eps = draw_noise(enc, ObjectiveConfig(), gen)
            loss = flow_step_loss(model, enc, t, eps, guidance=1.0, routing=v.routing)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    model.train()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    with FlopCounterMode(display=False) as counter:
        step()
    total = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fwd, sdpa_context(args.attention, device), autocast:
        t, eps = draw_noise(enc, ObjectiveConfig(), gen)
        flow_step_loss(model, enc, t, eps, guidance=1.0, routing=v.routing)
    recompute = fwd.get_total_flops() if model.gradient_checkpointing else 0
    # Free this variant's LoRA, gradients and AdamW state before the next one measures its peak.
    opt.state.clear()
    opt.param_groups.clear()
    params.clear()
    remove_branch_lora(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sp = spread(times, unit="s")
    return {"variant": v.name, "s_per_step": sp.pop("s"), **sp, "peak_gib": peak,
            "loss": loss, "model_tflop": (total - recompute) / 1e12, "hardware_tflop": total / 1e12}


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def report(rows: list[dict[str, Any]], peak: float | None, cuda: bool) -> str:
    """The table and the targets, in the words and layout of ``musar bench``'s."""
    base = rows[0]
    mem, mfu = bool(base["peak_gib"]), base.get("mfu") is not None  # columns only for what was measured
    lines = ["seconds per step: the median of n timed steps, then the min and max of those steps",
             f"{'variant':8} {'s/step':>8} {'min':>8} {'max':>8} {'n':>3} {'x plain':>8}"
             + (f" {'peak GiB':>9} {'x plain':>8}" if mem else "") + (f" {'MFU':>6} {'HFU':>6}" if mfu else "")]
    for r in rows:
        line = (f"{r['variant']:8} {r['s_per_step']:8.3f} {r['s_min']:8.3f} {r['s_max']:8.3f} {r['n']:>3} "
                f"{r['s_per_step'] / base['s_per_step']:8.3f}")
        if mem:
            line += f" {r['peak_gib']:9.2f} {r['peak_gib'] / base['peak_gib']:8.3f}"
        if mfu:
            line += f" {r['mfu']:6.1%} {r['hfu']:6.1%}"
        lines.append(line)
    lines += ["", *format_targets(judge(train_values(rows), cuda), cuda)]
    if peak is None:
        lines.append("MFU: unknown peak throughput (pass --peak-tflops)")
    return "\n".join(lines)


class _Renamed(argparse.Action):
    """An output flag the bench commands no longer take: argparse's one-line error names the new one."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is now --out (one output flag for every bench command)")


def main(argv: list[str] | None = None, on_rows: Callable[[dict[str, Any]], None] | None = None) -> int:
    """The command line; ``on_rows({"meta", "rows"})`` is called after each variant (the GPU suite)."""
    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(prog="python -m musar.bench.train_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", type=preset_name, choices=sorted(SHAPES), default="flux-dev-random",
                   help="model and shapes, as musar bench's presets (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median, min and max reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=128, help="subject / shared LoRA rank")
    p.add_argument("--noise-rank", type=int, default=4)
    p.add_argument("--lora-dtype", choices=["fp32", "bf16"], default="fp32", help="training default: fp32")
    p.add_argument("--attention", default="flash_efficient", help="SDPA kernels, as model.attention in training")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", default=None, help="also write the results to this JSON file, atomically (default: print only)")
    p.add_argument("--json", action=_Renamed, nargs="?", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_step: no CUDA device; use --device cpu --preset tiny for a smoke run", file=sys.stderr)
        return 2
    out = check_writable(args.out) if args.out else None  # before the minutes of work, not after
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(PRESETS[args.preset].config, device, dtype, seed=0)
    if not args.no_checkpointing:
        model.enable_gradient_checkpointing()
    peak = peak_tflops(args, device)
    shape = SHAPES[args.preset]
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "preset": args.preset, "shape": vars(shape), "lora_dtype": args.lora_dtype,
            "attention": args.attention, "checkpointing": not args.no_checkpointing, "peak_tflops": peak,
            "rank": args.rank, "noise_rank": args.noise_rank, "steps": args.steps, "warmup": args.warmup}
    rows = []
    todo = variants(args.rank, args.noise_rank)
    # tqdm's own rule: a bar only on a terminal, none in logs (the GPU suite's suite.log)
    for v in tqdm(todo, desc="train_step", unit="variant", disable=None, leave=False):
        r = run_variant(model, v, args, device)
        if peak:
            r["mfu"] = r["model_tflop"] / r["s_per_step"] / peak
            r["hfu"] = r["hardware_tflop"] / r["s_per_step"] / peak
        rows.append(r)
        result = {"meta": meta, "rows": [replace_none(r) for r in rows]}
        if out is not None:  # after every variant, so a run stopped by a time box keeps what it measured
            atomic_write_json(out, result)
        if on_rows is not None:
            on_rows(result)
    print(f"train_step  preset={args.preset}  device={meta['device']} ({device.type})  dtype={str(dtype).replace('torch.', '')}  "
          f"{shape.width}x{shape.height} diptych, c = 2 refs {shape.cond}px, LoRA rank {args.rank}/{args.noise_rank}, "
          f"attention={args.attention}, checkpointing {'on' if not args.no_checkpointing else 'off'}, "
          f"{args.warmup} untimed + {args.steps} timed steps per variant")
    print(report(rows, peak, device.type == "cuda"))
    if out is not None:
        print(f"train_step: wrote {out}", file=sys.stderr)
    elif on_rows is None:  # the GPU suite keeps the rows itself: nothing to point its log at
        print("train_step: printed only, nothing written (--out FILE.json keeps every timed step)", file=sys.stderr)
    return 0


def replace_none(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


if __name__ == "__main__":
    sys.exit(main())
