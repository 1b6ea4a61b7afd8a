"""``musar generate``: one image from a prompt and N subjects, with a reproducibility sidecar."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from musar.cli.args import add, add_attention, value
from musar.errors import MusarError
from musar.pipelines import quantization_spec as quant
from musar.utils.io import atomic_write_json, write_image_and_sidecar
from musar.utils.validation import (
    CONDITION_SIZE,
    DEFAULT_MAX_IMAGE_PIXELS,
    GUIDANCE,
    HEIGHT,
    MAX_IMAGE_PIXELS,
    SEED,
    STEPS,
    WIDTH,
    check_image_output,
    check_lora_file,
    check_model_source,
    check_output_dir,
    check_preset_name,
    nonempty_text,
    sidecar_path,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate an image from a prompt and reference subjects")
    add(p, "--prompt", required=True, type=nonempty_text("prompt"), help="main prompt; must contain every subject phrase")
    add(
        p, "--subject", nargs=2, action="append", metavar=("IMAGE", "PHRASE"), required=True, check=_check_subjects,
        help="a reference image and its phrase in the prompt (repeat for more subjects)",
    )
    src = p.add_mutually_exclusive_group()
    add(src, "--model", default=None, check=value(check_model_source),
        help="hub id or local folder of FLUX.1 (default black-forest-labs/FLUX.1-dev)")
    add(src, "--preset", default=None, check=value(check_preset_name),
        help="a registered preset: 'tiny' (random weights, smoke runs) or 'toy' (no download)")
    add(p, "--lora", default=None, check=value(check_lora_file), help="MUSAR LoRA weights (.safetensors)")
    add(p, "--steps", type=STEPS, default=28, help=f"denoising steps ({STEPS.describe()})")
    add(p, "--guidance", type=GUIDANCE, default=3.5, help=f"FLUX guidance scale ({GUIDANCE.describe()})")
    add(p, "--seed", type=SEED, default=0, help=f"noise seed ({SEED.describe()})")
    add(p, "--height", type=HEIGHT, default=1024, help=f"output height ({HEIGHT.describe()})")
    add(p, "--width", type=WIDTH, default=1024, help=f"output width ({WIDTH.describe()})")
    add(p, "--condition-size", type=CONDITION_SIZE, default=512,
        help=f"reference images are resized to this square ({CONDITION_SIZE.describe()})")
    add(p, "--condition-fit", choices=["pad", "crop"], default="pad", help="keep aspect by padding, or centre-crop")
    add(p, "--max-image-pixels", type=MAX_IMAGE_PIXELS, default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"refuse reference images above this many pixels, read from the header before decoding "
             f"(default {DEFAULT_MAX_IMAGE_PIXELS:,}; at most {MAX_IMAGE_PIXELS.hi:,})")
    add(p, "--out", default="musar.png", check=value(check_image_output),
        help="output PNG; a .json sidecar is written next to it")
    add(p, "--routing-maps", default=None, metavar="DIR", check=value(_check_maps_dir),
        help="write routing maps (Fig. 5 style) here")
    add(p, "--no-dynamic-routing", action="store_true", help="static routing only")
    add(
        p, "--box", nargs="+", action="append", metavar="COORD", check=_check_boxes,
        help="layout box of a subject: X0 Y0 X1 Y1 as fractions of the image (0..1, origin top left), or 'none'; "
        "give once per --subject, in the same order (all subjects or none). A token inside one box reads only "
        "that subject's reference",
    )
    add(
        p, "--outside-boxes", choices=["all", "none"], default="all", check=_check_outside,
        help="what tokens outside every box read: all = dynamic routing picks among all subjects (default), "
        "none = no reference",
    )
    add_attention(p)
    add(
        p, "--independent-conditions", action="store_true",
        help="conditions never see the noisy image (needs a LoRA trained so); caches their K/V across steps",
    )
    add(p, "--offload", choices=["none", "model", "sequential"], default="none", help="CPU offload for low VRAM")
    add(
        p, "--compile", action="store_true",
        help="torch.compile the transformer blocks (regional, no graph break in routed attention); the first "
        "step pays the compilation; on CPU it needs a C++ compiler",
    )
    add(p, "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    add(p, "--quantize", choices=quant.QUANTIZE_CHOICES, default="none", metavar=quant.METAVAR, help=quant.HELP,
        check=value(quant.check_quantize_arg))
    p.set_defaults(func=run)


ROUTING_MAP_FILES = ("routing_grid.png", "route_overlay.png", "routing.json")


def check_box_args(args: argparse.Namespace) -> list[tuple[float, float, float, float] | None] | None:
    """``--box`` / ``--outside-boxes`` as checked boxes (one-line MusarError); no model needed."""
    from musar.models.boxes import check_boxes, parse_box_args

    boxes = parse_box_args(args.box, len(args.subject))
    return check_boxes(
        boxes, len(args.subject), args.height, args.width,
        dynamic_routing=not args.no_dynamic_routing, outside=args.outside_boxes,
    )


def _check_boxes(box: list[list[str]], args: argparse.Namespace) -> None:
    check_box_args(args)


def _check_outside(outside: str, args: argparse.Namespace) -> None:
    if args.box is None and outside != "all":
        raise MusarError(f"--outside-boxes {outside} needs --box: it says what tokens outside every box read")


def _check_maps_dir(folder: str) -> None:
    check_output_dir(folder, ROUTING_MAP_FILES)


def _check_subjects(subjects: list[list[str]], args: argparse.Namespace) -> None:
    """Every reference decodes within the pixel limit and every phrase is in the prompt."""
    from musar.pipelines.spans import find_phrase_chars
    from musar.utils.images import load_reference

    for image, _ in subjects:
        load_reference(image, 16, max_pixels=args.max_image_pixels)
    find_phrase_chars(args.prompt, [phrase for _, phrase in subjects])


def run(args: argparse.Namespace) -> int:
    # Every argument was checked by musar.cli.args.validate before this point (nothing loaded yet).
    from musar.utils import images

    images.MAX_IMAGE_PIXELS = args.max_image_pixels  # the pipeline re-reads the references
    out = Path(args.out)
    boxes = check_box_args(args)

    import torch

    from musar.pipelines.presets import load_pipeline
    from musar.pipelines.registry import get_preset

    t0 = time.perf_counter()
    if args.preset and get_preset(args.preset).random_weights:
        print(f"musar: preset {args.preset!r} has RANDOM weights: the image is noise, for smoke tests only.", file=sys.stderr)
    pipe = load_pipeline(
        model=args.model, preset=args.preset, lora=args.lora, dtype=args.dtype, offload=args.offload, quantize=args.quantize
    )
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
    sidecar = _sidecar(args, pipe, result.timings | {"load_s": load_s}, boxes, result.routing)
    # One unit: whenever out exists, the sidecar beside it is its own (see write_image_and_sidecar).
    write_image_and_sidecar(out, lambda tmp: image.save(tmp, format="PNG"), sidecar)
    print(f"wrote {out} and {sidecar_path(out)}")
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
        "quantize": args.quantize,
        "device": str(pipe._execution_device),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def _write_routing_maps(folder: Path, result: Any, image: Any, phrases: list[str], outside_boxes: str) -> None:
    from musar.pipelines.routing_maps import save_routing_maps

    if save_routing_maps(result, image, phrases, folder) is None:
        print("musar: no routing maps: dynamic routing only acts with 2+ subjects (or boxes) and routing on", file=sys.stderr)
        return
    boxes = result.boxes
    extra = {
        "phrases": phrases, "grid": list(result.grid), "outside_boxes": outside_boxes,
        "boxes": None if boxes is None else [None if b is None else list(b) for b in boxes],
    }
    atomic_write_json(folder / "routing.json", result.routing.to_dict() | extra)
    print(f"wrote routing maps to {folder}/ (routing_grid.png, route_overlay.png)")
