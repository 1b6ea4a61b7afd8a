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
        "--box", nargs="+", action="append", metavar="COORD",
        help="layout box of a subject: X0 Y0 X1 Y1 as fractions of the image (0..1, origin top left), or 'none'; "
        "give once per --subject, in the same order (all subjects or none). A token inside one box reads only "
        "that subject's reference",
    )
    p.add_argument(
        "--outside-boxes", choices=["all", "none"], default="all",
        help="what tokens outside every box read: all = dynamic routing picks among all subjects (default), "
        "none = no reference",
    )
    p.add_argument(
        "--attention", choices=["auto", "fast", "flex", "reference"], default="auto",
        help="routed attention backend: auto = flex on CUDA, fast elsewhere; reference = dense mask (slow)",
    )
    p.add_argument(
        "--independent-conditions", action="store_true",
        help="conditions never see the noisy image (needs a LoRA trained so); caches their K/V across steps",
    )
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none", help="CPU offload for low VRAM")
    p.add_argument(
        "--compile", action="store_true",
        help="torch.compile the transformer blocks (regional, no graph break in routed attention); the first "
        "step pays the compilation; on CPU it needs a C++ compiler",
    )
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


def check_box_args(args: argparse.Namespace) -> list[tuple[float, float, float, float] | None] | None:
    """``--box`` / ``--outside-boxes`` as checked boxes (one-line MusarError); no model needed."""
    from musar.models.boxes import check_boxes, parse_box_args

    if args.box is None and args.outside_boxes != "all":
        raise MusarError(f"--outside-boxes {args.outside_boxes} needs --box: it says what tokens outside every box read")
    boxes = parse_box_args(args.box, len(args.subject))
    return check_boxes(
        boxes, len(args.subject), args.height, args.width,
        dynamic_routing=not args.no_dynamic_routing, outside=args.outside_boxes,
    )


def run(args: argparse.Namespace) -> int:
    out = _validate(args)
    boxes = check_box_args(args)
    from musar.pipelines.spans import find_phrase_chars
    from musar.utils.images import load_reference

    # Cheap checks before the (slow) model load: files and phrases.
    for image, _ in args.subject:
        load_reference(image, 16)
    find_phrase_chars(args.prompt, [phrase for _, phrase in args.subject])

    import torch

    from musar.pipelines.presets import load_pipeline

    t0 = time.perf_counter()
    if args.preset:
        print(f"musar: preset {args.preset!r} has RANDOM weights: the image is noise, for smoke tests only.", file=sys.stderr)
    pipe = load_pipeline(model=args.model, preset=args.preset, lora=args.lora, dtype=args.dtype, offload=args.offload)
    if args.compile:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
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
        boxes=boxes,
        outside_boxes=args.outside_boxes,
        return_routing=True,  # the sidecar records the share of tokens routed to each subject
    )
    image = result.images[0]
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    sidecar = _sidecar(args, pipe, result.timings | {"load_s": load_s}, boxes, result.routing)
    atomic_write_json(out.with_suffix(".json"), sidecar)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    if args.routing_maps:
        _write_routing_maps(Path(args.routing_maps), result, image, [p for _, p in args.subject], args.outside_boxes)
    return 0


def _sidecar(
    args: argparse.Namespace, pipe: Any, timings: dict[str, float], boxes: list[Any] | None, routing: Any
) -> dict[str, Any]:
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
        "boxes": None if boxes is None else [None if b is None else list(b) for b in boxes],
        "outside_boxes": args.outside_boxes,
        # per subject, the share of NOISE tokens routed to it at each step (mean over routed layers)
        "route_share": routing.route_share() if routing is not None and routing.steps else None,
        "attention": args.attention,
        "independent_conditions": args.independent_conditions,
        "offload": args.offload,
        "compile": args.compile,
        "dtype": args.dtype,
        "device": str(pipe._execution_device),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def _write_routing_maps(folder: Path, result: Any, image: Any, phrases: list[str], outside_boxes: str) -> None:
    from musar.pipelines.routing_maps import route_overlay, save_routing_grid

    if result.routing is None or not result.routing.steps:
        print("musar: no routing maps: dynamic routing only acts with 2+ subjects (or boxes) and routing on", file=sys.stderr)
        return
    rec, boxes = result.routing, result.boxes
    save_routing_grid(rec, result.grid, phrases, folder / "routing_grid.png", boxes=boxes)
    overlay = route_overlay(image, rec.routes(rec.steps[-1])[0], result.grid, boxes=boxes, num_conditions=len(phrases))
    with atomic_path(folder / "route_overlay.png") as tmp:
        overlay.save(tmp, format="PNG")
    extra = {
        "phrases": phrases, "grid": list(result.grid), "outside_boxes": outside_boxes,
        "boxes": None if boxes is None else [None if b is None else list(b) for b in boxes],
    }
    atomic_write_json(folder / "routing.json", rec.to_dict() | extra)
    print(f"wrote routing maps to {folder}/ (routing_grid.png, route_overlay.png)")
