"""``musar generate``: one image from a prompt and N subjects, with a reproducibility sidecar."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from musar.errors import MusarError
from musar.utils.io import atomic_path, atomic_write_json, check_writable


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate an image from a prompt and reference subjects")
    p.add_argument("--prompt", required=True, help="main prompt; must contain every subject phrase")
    p.add_argument(
        "--subject", nargs=2, action="append", metavar=("IMAGE", "PHRASE"), required=True,
        help="a reference image and its phrase in the prompt (repeat for more subjects)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="hub id or local folder of FLUX.1 (default black-forest-labs/FLUX.1-dev)")
    src.add_argument("--preset", default=None, help="'tiny': random-weight toy pipeline for smoke runs (no download)")
    p.add_argument("--lora", default=None, help="MUSAR LoRA weights (.safetensors)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--condition-size", type=int, default=512, help="reference images are resized to this square")
    p.add_argument("--condition-fit", choices=["pad", "crop"], default="pad", help="keep aspect by padding, or centre-crop")
    p.add_argument("--out", default="musar.png", help="output PNG; a .json sidecar is written next to it")
    p.add_argument("--routing-maps", default=None, metavar="DIR", help="write routing maps (Fig. 5 style) here")
    p.add_argument("--no-dynamic-routing", action="store_true", help="static routing only")
    p.add_argument(
        "--attention", choices=["auto", "fast", "flex", "reference"], default="auto",
        help="routed attention backend: auto = flex on CUDA, fast elsewhere; reference = dense mask (slow)",
    )
    p.add_argument(
        "--independent-conditions", action="store_true",
        help="conditions never see the noisy image (needs a LoRA trained so); caches their K/V across steps",
    )
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none", help="CPU offload for low VRAM")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> Path:
    from musar.utils.checks import check_size, check_steps

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise MusarError(f"--out must be a .png file, got {out}")
    check_size(args.height, args.width)
    check_steps(args.steps)
    check_writable(out)
    if args.routing_maps:
        check_writable(Path(args.routing_maps) / "routing_grid.png")
    return out


def run(args: argparse.Namespace) -> int:
    out = _validate(args)
    from musar.pipelines.spans import find_phrase_chars
    from musar.utils.images import load_reference

    # Cheap checks before the (slow) model load: files and phrases.
    for image, _ in args.subject:
        load_reference(image, 16)
    find_phrase_chars(args.prompt, [phrase for _, phrase in args.subject])

    import torch

    from musar.pipelines.presets import load_pipeline
    from musar.pipelines.registry import get_preset

    t0 = time.perf_counter()
    if args.preset and get_preset(args.preset).random_weights:
        print(f"musar: preset {args.preset!r} has RANDOM weights: the image is noise, for smoke tests only.", file=sys.stderr)
    pipe = load_pipeline(model=args.model, preset=args.preset, lora=args.lora, dtype=args.dtype, offload=args.offload)
    load_s = time.perf_counter() - t0
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    result = pipe(
        prompt=args.prompt,
        subjects=[(image, phrase) for image, phrase in args.subject],
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=generator,
        condition_size=args.condition_size,
        condition_fit=args.condition_fit,
        dynamic_routing=not args.no_dynamic_routing,
        attention=args.attention,
        independent_conditions=args.independent_conditions,
        return_routing=bool(args.routing_maps),
    )
    image = result.images[0]
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    sidecar = _sidecar(args, pipe, result.timings | {"load_s": load_s})
    atomic_write_json(out.with_suffix(".json"), sidecar)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    if args.routing_maps:
        _write_routing_maps(Path(args.routing_maps), result, image, [p for _, p in args.subject])
    return 0


def _sidecar(args: argparse.Namespace, pipe: Any, timings: dict[str, float]) -> dict[str, Any]:
    import musar

    return {
        "musar_version": musar.__version__,
        "command": "musar generate",
        "prompt": args.prompt,
        "subjects": [{"image": str(Path(i).resolve()), "phrase": p} for i, p in args.subject],
        "model": args.model if args.model else (None if args.preset else "black-forest-labs/FLUX.1-dev"),
        "preset": args.preset,
        "lora": {"path": str(Path(args.lora).resolve()), "sha256": pipe.lora_sha256} if args.lora else None,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "height": args.height,
        "width": args.width,
        "condition_size": args.condition_size,
        "condition_fit": args.condition_fit,
        "dynamic_routing": not args.no_dynamic_routing,
        "attention": args.attention,
        "independent_conditions": args.independent_conditions,
        "offload": args.offload,
        "dtype": args.dtype,
        "device": str(pipe._execution_device),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def _write_routing_maps(folder: Path, result: Any, image: Any, phrases: list[str]) -> None:
    from musar.pipelines.routing_maps import route_overlay, save_routing_grid

    if result.routing is None or not result.routing.steps:
        print("musar: no routing maps: dynamic routing only acts with 2+ subjects and routing on", file=sys.stderr)
        return
    rec = result.routing
    save_routing_grid(rec, result.grid, phrases, folder / "routing_grid.png")
    overlay = route_overlay(image, rec.routes(rec.steps[-1])[0], result.grid)
    with atomic_path(folder / "route_overlay.png") as tmp:
        overlay.save(tmp, format="PNG")
    atomic_write_json(folder / "routing.json", rec.to_dict() | {"phrases": phrases, "grid": list(result.grid)})
    print(f"wrote routing maps to {folder}/ (routing_grid.png, route_overlay.png)")
