"""``musar eval``: run a protocol and write the Table-1 report; ``musar eval compare``: one table
across runs.

The generator comes from ``musar.pipelines.pipeline_musar.load_pipeline`` (imported only when a run starts, so
``compare`` and the tests work without it). Ablations are expressed in :data:`ABLATIONS` as the
keyword arguments they add to ``load_pipeline`` and to each pipeline call, nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from PIL import Image

from musar.errors import MusarError
from musar.eval.protocols import DEFAULT_SEEDS, PROTOCOLS, build_cases
from musar.pipelines import quantization_spec as quant


@dataclass(frozen=True)
class Ablation:
    """How one ablation changes the generator."""

    help: str
    call_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    load_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


# The paper's ablations (Table 2 style). The full model passes dynamic_routing=True explicitly so
# every run records what it used. `single-lora` is a loading option: one LoRA branch applied to
# NOISE and COND rows alike, for LoRA files trained that way.
ABLATIONS: Mapping[str, Ablation] = MappingProxyType(
    {
        "none": Ablation("full MUSAR", MappingProxyType({"dynamic_routing": True})),
        "no-dynamic-routing": Ablation("static routing only", MappingProxyType({"dynamic_routing": False})),
        "no-static-routing": Ablation(
            "no static attention mask", MappingProxyType({"dynamic_routing": True, "static_routing": False})
        ),
        "single-lora": Ablation(
            "one LoRA for all non-prompt tokens",
            MappingProxyType({"dynamic_routing": True}),
            MappingProxyType({"single_lora": True}),
        ),
    }
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate on DreamBench or custom cases (DINO, CLIP-I, CLIP-T; Table 1 layout)",
        description="Generate every case for every seed (resumable), score it and write cases.csv, "
        "summary.json, table.md and image grids under --out. 'musar eval compare DIR...' prints one "
        "table across finished runs.",
    )
    p.add_argument("--protocol", choices=PROTOCOLS, help="which cases to run")
    p.add_argument("--data", help="DreamBench folder (dreambench-*) or JSON cases file (custom)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="base model: hub id or local folder")
    src.add_argument("--preset", help="built-in model preset, e.g. 'tiny' (random weights, for smoke tests)")
    p.add_argument("--lora", help="MUSAR LoRA file (.safetensors)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="default: 0 1 2 3")
    p.add_argument("--limit", type=int, help="evaluate only the first N cases")
    p.add_argument("--ablation", choices=list(ABLATIONS), default="none", help="paper ablation to apply")
    p.add_argument("--dino-model", default=None, help="DINO ViT-S/16: hub id[@rev] or local folder")
    p.add_argument("--clip-model", default=None, help="CLIP ViT-B/32: hub id[@rev] or local folder")
    p.add_argument("--out", help="run folder (re-running the same command resumes)")
    p.add_argument("--label", help="row name in tables (default: model + LoRA + ablation)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=28, help="denoising steps")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX guidance scale")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--quantize", choices=quant.QUANTIZE_CHOICES, default="none", metavar=quant.METAVAR, help=quant.HELP)
    p.add_argument("--attention", default="fast", help="attention backend: 'fast' or 'reference'")
    p.add_argument("--metrics-batch-size", type=int, default=32)
    p.add_argument("--skip-metrics", action="store_true", help="only generate images and grids")
    p.add_argument("--no-grids", action="store_true", help="do not write per-case image grids")
    # One entry point for both forms: which parser's set_defaults wins for nested subparsers has
    # changed between Python releases, so dispatch on the subcommand name instead.
    p.set_defaults(func=eval_command)
    sub = p.add_subparsers(dest="eval_command", metavar="compare")
    c = sub.add_parser("compare", help="one Table-1 table across evaluation folders")
    c.add_argument("dirs", nargs="+", help="run folders written by 'musar eval'")


def eval_command(args: argparse.Namespace) -> int:
    if getattr(args, "eval_command", None) == "compare":
        return compare_command(args)
    return run_command(args)


def compare_command(args: argparse.Namespace) -> int:
    from musar.eval.report import compare

    print(compare(args.dirs), end="")
    return 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch

    import musar

    lora = Path(args.lora).expanduser().resolve() if args.lora else None
    if lora is not None and not lora.is_file():
        raise MusarError(f"LoRA file not found: {lora}")
    return {
        "protocol": args.protocol,
        "data": str(Path(args.data).expanduser().resolve()),
        "model": args.model,
        "preset": args.preset,
        "lora": str(lora) if lora else None,
        "lora_sha256": _sha256(lora) if lora else None,
        "ablation": args.ablation,
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "guidance": args.guidance,
        "dtype": args.dtype,
        # only when set, so run folders made before --quantize existed still resume
        **({"quantize": args.quantize} if args.quantize != "none" else {}),
        "attention": args.attention,
        "limit": args.limit,
        "label": args.label,
        "musar_version": musar.__version__,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
    }


def _accepts(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes keyword ``name`` (directly or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_generator(args: argparse.Namespace) -> Any:
    """``generate(prompt, subjects, seed) -> PIL.Image`` around the project's ``load_pipeline``."""
    import torch

    from musar.pipelines.presets import load_pipeline

    ablation = ABLATIONS[args.ablation]
    pipe = load_pipeline(
        model=args.model,
        preset=args.preset,
        lora=args.lora,
        dtype=args.dtype,
        attention=args.attention,
        **({"quantize": args.quantize} if args.quantize != "none" else {}),
        **ablation.load_kwargs,
    )
    # Optional call settings, passed only where the pipeline takes them: the per-call attention
    # backend, and no inner progress bar under the runner's own.
    extra = {k: v for k, v in (("attention", args.attention), ("progress", False)) if _accepts(pipe, k)}

    def generate(prompt: str, subjects: list[tuple[Image.Image, str]], seed: int) -> Image.Image:
        result = pipe(
            prompt=prompt,
            subjects=subjects,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(seed),
            **ablation.call_kwargs,
            **extra,
        )
        return result.images[0]

    return generate


def run_command(args: argparse.Namespace) -> int:
    missing = [
        flag
        for flag, value in (("--protocol", args.protocol), ("--data", args.data), ("--out", args.out))
        if not value
    ]
    if missing:
        raise MusarError(f"{', '.join(missing)} required (or use 'musar eval compare DIR...')")
    for flag, value in (("--height", args.height), ("--width", args.width), ("--steps", args.steps)):
        if value < 1:
            raise MusarError(f"{flag} must be positive, got {value}")
    settings = _settings(args)
    cases = build_cases(args.protocol, args.data, args.limit)
    metrics = None
    if not args.skip_metrics:
        # Loaded before the generator so a missing metric model fails in seconds, not hours.
        from musar.eval.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, Metrics, MetricsConfig

        metrics = Metrics(
            MetricsConfig(
                dino_model=args.dino_model or DEFAULT_DINO_MODEL,
                clip_model=args.clip_model or DEFAULT_CLIP_MODEL,
                batch_size=args.metrics_batch_size,
            )
        )
    from musar.eval.runner import run_eval  # torch-heavy; keep `musar --help` fast

    generate = build_generator(args)
    result = run_eval(
        cases,
        generate,
        metrics,
        seeds=args.seeds,
        out_dir=args.out,
        settings=settings,
        grids=not args.no_grids,
    )
    print((Path(args.out) / "table.md").read_text(encoding="utf-8"), end="")
    print(f"{result.generated} images generated, {result.reused} reused; report in {args.out}")
    return 0
