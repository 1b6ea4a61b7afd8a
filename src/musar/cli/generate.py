"""``musar generate``: one image from a prompt and N subjects, with a reproducibility sidecar.

Sizes, steps, guidance and token counts left out come from the preset
(:func:`musar.pipelines.presets.generation_defaults`: the toy preset draws 64x64 in 16 steps),
else FLUX.1's; a flag always wins. The sidecar records the values used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from musar.cli.args import HelpFormatter, add, add_attention, add_threads, torch_threads, value
from musar.errors import MusarError
from musar.models.boxes import DEFAULT_OUTSIDE, OUTSIDE_POLICIES
from musar.pipelines import quantization_spec as quant
from musar.utils.dtypes import dtype_name
from musar.utils.io import write_image_and_sidecar
from musar.utils.validation import (
    CONDITION_FITS,
    CONDITION_SIZE,
    DEFAULT_CONDITION_FIT,
    DEFAULT_MAX_IMAGE_PIXELS,
    GUIDANCE,
    HEIGHT,
    MAX_IMAGE_PIXELS,
    SEED,
    STEPS,
    WIDTH,
    Number,
    check_image_output,
    check_lora_file,
    check_model_source,
    check_output_dir,
    check_preset_name,
    nonempty_text,
    sidecar_path,
)

# FLUX.1's generation defaults as --help states them (MusarPipeline.__call__'s own, which
# musar.pipelines.presets.FLUX_GENERATION reads; that module imports torch, so a test keeps the two
# equal). Flags left out take the preset's default, else these.
FLUX_DEFAULTS: dict[str, int | float] = {
    "height": 1024, "width": 1024, "steps": 28, "guidance": 3.5, "condition_size": 512,
    "phrase_tokens": 32, "max_sequence_length": 512,
}
GENERATION_FLAGS = tuple(FLUX_DEFAULTS)
# T5 token counts: FLUX.1's T5 reads at most 512 tokens (diffusers' FluxPipeline refuses more).
PHRASE_TOKENS = Number("phrase tokens", int, 1, 512, why="T5 tokens per subject phrase; FLUX's T5 reads 512 at most")
PROMPT_TOKENS = Number("max sequence length", int, 1, 512, why="T5 tokens of the main prompt; FLUX's T5 reads 512 at most")


def _preset_default(name: str) -> str:
    return f"(default: the preset's, else FLUX's {FLUX_DEFAULTS[name]})"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate an image from a prompt and reference subjects", formatter_class=HelpFormatter,
        description="One image from a prompt and N reference subjects, and a .json sidecar with every value used. "
        "Sizes, steps, guidance and token counts left out come from --preset (toy: 64x64, 16 steps), else FLUX.1's.",
    )
    add(p, "--prompt", required=True, type=nonempty_text("prompt"), help="main prompt; must contain every subject phrase")
    add(
        p, "--subject", nargs=2, action="append", metavar=("IMAGE", "PHRASE"), required=True, check=_check_subjects,
        help="a reference image and its phrase in the prompt (repeat for more subjects)",
    )
    src = p.add_mutually_exclusive_group()
    add(src, "--model", default=None, check=value(_check_model),
        help="hub id or local folder of FLUX.1 (default: black-forest-labs/FLUX.1-dev unless --preset)")
    add(src, "--preset", default=None, check=value(check_preset_name),
        help="a registered preset instead of --model: 'tiny' (random weights, smoke runs) or 'toy' (no download); "
        "it also sets the defaults of --height, --width, --steps, --guidance, --condition-size, --phrase-tokens "
        "and --max-sequence-length (default: none, FLUX.1)")
    add(p, "--lora", default=None, check=value(check_lora_file),
        help="MUSAR LoRA weights (.safetensors) (default: none; a preset's own where it has one)")
    add(p, "--steps", type=STEPS, default=None, help=f"denoising steps ({STEPS.describe()}) {_preset_default('steps')}")
    add(p, "--guidance", type=GUIDANCE, default=None,
        help=f"FLUX guidance scale ({GUIDANCE.describe()}) {_preset_default('guidance')}")
    add(p, "--seed", type=SEED, default=0, help=f"noise seed ({SEED.describe()})")
    add(p, "--height", type=HEIGHT, default=None, help=f"output height ({HEIGHT.describe()}) {_preset_default('height')}")
    add(p, "--width", type=WIDTH, default=None, help=f"output width ({WIDTH.describe()}) {_preset_default('width')}")
    add(p, "--condition-size", type=CONDITION_SIZE, default=None,
        help=f"reference images are resized to this square ({CONDITION_SIZE.describe()}) {_preset_default('condition_size')}")
    add(p, "--condition-fit", choices=CONDITION_FITS, default=DEFAULT_CONDITION_FIT, help="keep aspect by padding, or centre-crop")
    add(p, "--phrase-tokens", type=PHRASE_TOKENS, default=None, metavar="N",
        help=f"T5 tokens per subject phrase ({PHRASE_TOKENS.describe()}) {_preset_default('phrase_tokens')}")
    add(p, "--max-sequence-length", type=PROMPT_TOKENS, default=None, metavar="N",
        help=f"T5 tokens of the main prompt ({PROMPT_TOKENS.describe()}) {_preset_default('max_sequence_length')}")
    add(p, "--max-image-pixels", type=MAX_IMAGE_PIXELS, default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"refuse reference images above this many pixels, read from the header before decoding "
             f"(at most {MAX_IMAGE_PIXELS.hi:,})")
    add(p, "--out", default="musar.png", check=value(check_image_output),
        help="output PNG; a .json sidecar is written next to it")
    add(p, "--routing-maps", default=None, metavar="DIR", check=_check_maps_dir,
        help="write routing maps (Fig. 5 style) here (default: none)")
    add(p, "--no-dynamic-routing", action="store_true", help="static routing only")
    add(
        p, "--box", nargs="+", action="append", metavar="COORD", check=_check_boxes,
        help="layout box of a subject: X0 Y0 X1 Y1 as fractions of the image (0..1, origin top left), or 'none'; "
        "give once per --subject, in the same order (all subjects or none). A token inside one box reads only "
        "that subject's reference (default: no boxes)",
    )
    add(
        p, "--outside-boxes", choices=OUTSIDE_POLICIES, default=DEFAULT_OUTSIDE, check=_check_outside,
        help="what tokens outside every box read: all = dynamic routing picks among all subjects, "
        "none = no reference (default: %(default)s)",
    )
    add_attention(p)
    add_threads(p)
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
    add(p, "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
        help="weights dtype of a --model (presets keep their own, fp32)")
    add(p, "--quantize", choices=quant.QUANTIZE_CHOICES, default="none", metavar=quant.METAVAR, help=quant.HELP,
        check=value(check_quantize))
    p.set_defaults(func=run)


def check_quantize(spec: str) -> None:
    """``--quantize``: the package and device (quantization_spec), and a GGUF file's whole header."""
    quant.check_quantize_arg(spec)
    if spec.startswith(quant.GGUF_PREFIX):
        from musar.pipelines.gguf import read_gguf_header  # torch-free

        read_gguf_header(spec[len(quant.GGUF_PREFIX):])


# What --routing-maps DIR gets (musar.pipelines.routing_maps.routing_map_writers; a test keeps them equal).
ROUTING_MAP_FILES = ("routing_grid.png", "route_overlay.png", "routing.json")


def planned_outputs(args: argparse.Namespace) -> list[Path]:
    """Every file this run will write: the image, its sidecar, the routing maps."""
    out = Path(args.out).expanduser()
    paths = [out, sidecar_path(out)]
    if args.routing_maps is not None:
        paths += [Path(args.routing_maps).expanduser() / name for name in ROUTING_MAP_FILES]
    return paths


def check_distinct_outputs(paths: list[Path]) -> None:
    """Refuse two outputs of one run at the same file (after symlinks and ``..``): one would
    silently overwrite the other, and the image would no longer match its sidecar."""
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            raise MusarError(f"{path} would be written twice in one run (also as {seen[key]}); give --out and "
                             f"--routing-maps paths that do not collide")
        seen[key] = path


def resolve_generation(args: argparse.Namespace, names: tuple[str, ...] = GENERATION_FLAGS) -> argparse.Namespace:
    """Fill the generation flags ``names`` left out (None) with the preset's default, else FLUX.1's.

    Nothing is imported when none is missing or there is no --preset; otherwise the preset's
    module is (for its declared defaults), not its weights. Given flags are never touched.
    """
    missing = [name for name in names if getattr(args, name, None) is None]
    if not missing:
        return args
    if args.preset is None:
        defaults = FLUX_DEFAULTS
    else:
        import dataclasses

        from musar.pipelines.presets import generation_defaults

        defaults = dataclasses.asdict(generation_defaults(args.preset))
    for name in missing:
        setattr(args, name, defaults[name])
    return args


def check_box_args(
    args: argparse.Namespace, token_px: int | None = None
) -> list[tuple[float, float, float, float] | None] | None:
    """``--box`` / ``--outside-boxes`` as checked boxes (one-line MusarError), each at least one of
    the model's tokens (``token_px``; None: read from the model's configs, no weight loaded)."""
    from musar.models.boxes import check_boxes, parse_box_args

    boxes = parse_box_args(args.box, len(args.subject))
    if boxes is not None:  # a box is checked at the size it will be drawn at, in the model's tokens
        resolve_generation(args, ("height", "width"))
        if token_px is None:
            from musar.pipelines.preload import declared_token_px

            token_px = declared_token_px(args.model, args.preset)
    return check_boxes(
        boxes, len(args.subject), args.height, args.width,
        dynamic_routing=not args.no_dynamic_routing, outside=args.outside_boxes,
        **({} if token_px is None else {"token_px": token_px}),
    )


def _check_boxes(box: list[list[str]], args: argparse.Namespace) -> None:
    check_box_args(args)


def _check_outside(outside: str, args: argparse.Namespace) -> None:
    if args.box is None and outside != DEFAULT_OUTSIDE:
        raise MusarError(f"--outside-boxes {outside} needs --box: it says what tokens outside every box read")


def _check_model(spec: str) -> None:
    from musar.pipelines.model_folder import check_model_folder  # torch-free: reads JSON only

    check_model_source(spec)
    check_model_folder(spec, resolve_classes=False)  # classes are resolved by from_pretrained


def _check_maps_dir(folder: str, args: argparse.Namespace) -> None:
    check_output_dir(folder, ROUTING_MAP_FILES)
    check_distinct_outputs(planned_outputs(args))


def _check_subjects(subjects: list[list[str]], args: argparse.Namespace) -> None:
    """Every reference decodes within the pixel limit and every phrase is in the prompt."""
    from musar.utils.images import load_reference
    from musar.utils.spans import find_phrase_chars

    for image, _ in subjects:
        load_reference(image, 16, max_pixels=args.max_image_pixels)
    find_phrase_chars(args.prompt, [phrase for _, phrase in subjects])


def run(args: argparse.Namespace) -> int:
    # Every argument was checked by musar.cli.args.validate before this point (nothing loaded yet).
    from musar.utils import images

    images.MAX_IMAGE_PIXELS = args.max_image_pixels  # the pipeline re-reads the references
    out = Path(args.out)
    check_distinct_outputs(planned_outputs(args))  # also for callers that skip validate()
    resolve_generation(args)  # the preset's defaults (else FLUX's) for every flag left out
    boxes = preflight(args)
    with torch_threads(args.threads) as threads:
        return _generate(args, out, boxes, threads)


def preflight(args: argparse.Namespace) -> list[Any] | None:
    """The checks that need the model, from its configs and tokenizer, before any weight loads:
    the boxes in its tokens, the phrases through its tokenizer, the LoRA and GGUF files against its
    transformer, the memory the run needs (musar.cli.preflight). Returns the checked boxes."""
    from musar.cli.preflight import check_generation_run
    from musar.pipelines.preload import model_facts

    facts = model_facts(args.model, args.preset)
    boxes = check_box_args(args, facts.token_px)
    check_generation_run(
        facts, prompts=[(args.prompt, [phrase for _, phrase in args.subject])], height=args.height, width=args.width,
        refs=len(args.subject), condition_size=args.condition_size, prompt_tokens=args.max_sequence_length,
        phrase_tokens=args.phrase_tokens, dtype=args.dtype, quantize=args.quantize, offload=args.offload,
        lora=args.lora, lower="--height/--width, --condition-size or the number of --subject",
    )
    return boxes


def _generate(args: argparse.Namespace, out: Path, boxes: list[Any] | None, threads: dict[str, int]) -> int:
    import torch

    from musar.pipelines.presets import load_pipeline
    from musar.utils.registry import get_preset

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
        phrase_tokens=args.phrase_tokens,
        max_sequence_length=args.max_sequence_length,
        dynamic_routing=not args.no_dynamic_routing,
        attention=args.attention,
        independent_conditions=args.independent_conditions,
        boxes=boxes,
        outside_boxes=args.outside_boxes,
        return_routing=True,  # the sidecar records the share of tokens routed to each subject
    )
    image = result.images[0]
    sidecar = _sidecar(args, pipe, result.timings | {"load_s": load_s}, boxes, result.routing, threads)
    # The maps are staged (written, not yet in place) before the image: a failure anywhere (a full
    # disk) then changes none of the run's files, and they move into place only after the pair.
    maps = _stage_routing_maps(args, result, image) if args.routing_maps else None
    try:
        # Whenever out exists, the sidecar beside it is its own (see write_image_and_sidecar).
        write_image_and_sidecar(out, lambda tmp: image.save(tmp, format="PNG"), sidecar)
        if maps is not None:
            maps.commit()
    finally:
        if maps is not None:
            maps.discard()
    print(f"wrote {out} and {sidecar_path(out)}")
    if maps is not None:
        print(f"wrote routing maps to {args.routing_maps}/ ({', '.join(ROUTING_MAP_FILES)})")
    return 0


def _sidecar(
    args: argparse.Namespace, pipe: Any, timings: dict[str, float], boxes: list[Any] | None, routing: Any,
    threads: dict[str, int],
) -> dict[str, Any]:
    import musar
    from musar.models.options import resolve_backend

    return {
        "musar_version": musar.__version__,
        "command": "musar generate",
        "prompt": args.prompt,
        "subjects": [{"image": str(Path(i).resolve()), "phrase": p} for i, p in args.subject],
        "model": args.model if args.model else (None if args.preset else "black-forest-labs/FLUX.1-dev"),
        "preset": args.preset,
        # What the pipeline actually loaded: a preset may bring its own LoRA (toy) without --lora.
        "lora": ({"path": str(Path(pipe.lora_path).resolve()), "sha256": pipe.lora_sha256,
                  "from": "--lora" if args.lora else f"preset {args.preset}"} if getattr(pipe, "lora_path", None) else None),
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "height": args.height,
        "width": args.width,
        "condition_size": args.condition_size,
        "condition_fit": args.condition_fit,
        "phrase_tokens": args.phrase_tokens,
        "max_sequence_length": args.max_sequence_length,
        "dynamic_routing": not args.no_dynamic_routing,
        "boxes": None if boxes is None else [None if b is None else list(b) for b in boxes],
        "outside_boxes": args.outside_boxes,
        # per subject, the share of NOISE tokens routed to it at each step (mean over routed layers)
        "route_share": routing.route_share() if routing is not None and routing.steps else None,
        "attention": args.attention,
        "attention_resolved": resolve_backend(args.attention, pipe._execution_device),  # what "auto" meant here
        "independent_conditions": args.independent_conditions,
        "offload": args.offload,
        "compile": args.compile,
        # what ran: presets keep their own dtype (tiny and toy run fp32 whatever --dtype says)
        "dtype": dtype_name(pipe.transformer.dtype),
        **({"dtype_requested": args.dtype} if dtype_name(pipe.transformer.dtype) != args.dtype else {}),
        "quantize": args.quantize,
        "device": str(pipe._execution_device),
        **threads,  # "threads" (intra-op) and "interop_threads" in force
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def _stage_routing_maps(args: argparse.Namespace, result: Any, image: Any) -> Any:
    from musar.pipelines.routing_maps import stage_routing_maps

    phrases = [p for _, p in args.subject]
    boxes = result.boxes
    record = {
        "phrases": phrases, "grid": list(result.grid), "outside_boxes": args.outside_boxes,
        "boxes": None if boxes is None else [None if b is None else list(b) for b in boxes],
    }
    staged = stage_routing_maps(result, image, phrases, Path(args.routing_maps), record)
    if staged is None:
        print("musar: no routing maps: dynamic routing only acts with 2+ subjects (or boxes) and routing on", file=sys.stderr)
    return staged
