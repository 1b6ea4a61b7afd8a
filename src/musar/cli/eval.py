"""``musar eval``: run a protocol and write the Table-1 report; ``musar eval compare``: one table
across runs.

The generator comes from ``musar.pipelines.presets.load_pipeline`` (imported only when a run starts, so
``compare`` and the tests work without it). Ablations are expressed in :data:`ABLATIONS` as the
keyword arguments they add to ``load_pipeline`` and to each pipeline call, nothing else.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from PIL import Image

from musar.cli.args import HelpFormatter, add, add_attention, add_threads, each, torch_threads, value
from musar.errors import MusarError
from musar.eval.protocols import DEFAULT_SEEDS, PROTOCOLS, build_cases
from musar.pipelines import quantization_spec as quant
from musar.utils.io import file_sha256
from musar.utils.validation import (
    COUNT,
    GUIDANCE,
    HEIGHT,
    METRICS_BATCH,
    SEED,
    STEPS,
    WIDTH,
    check_input_dir,
    check_lora_file,
    check_model_source,
    check_output_dir,
    check_preset_name,
)


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
        formatter_class=HelpFormatter,
    )
    add(p, "--protocol", choices=PROTOCOLS, help="which cases to run (required, except for 'compare')")
    add(p, "--data", check=value(_check_data),
        help="DreamBench folder (dreambench-*) or JSON cases file (custom) (required, except for 'compare')")
    src = p.add_mutually_exclusive_group()
    add(src, "--model", check=value(_check_model),
        help="base model: hub id or local folder (default: black-forest-labs/FLUX.1-dev unless --preset)")
    add(src, "--preset", check=value(check_preset_name),
        help="built-in model preset instead of --model, e.g. 'tiny' (random weights, for smoke tests) (default: none)")
    add(p, "--lora", check=value(check_lora_file), help="MUSAR LoRA file (.safetensors) (default: none, the base model)")
    add(p, "--seeds", type=SEED, nargs="+", default=list(DEFAULT_SEEDS), check=_check_seeds,
        help=f"noise seeds, each an {SEED.describe()}, no repeats")
    add(p, "--limit", type=COUNT, help="evaluate only the first N cases (default: all)")
    add(p, "--ablation", choices=list(ABLATIONS), default="none", help="paper ablation to apply")
    add(p, "--dino-model", default=None, check=value(_check_metric_model),
        help="DINO ViT-S/16: hub id[@rev] or local folder (default: facebook/dino-vits16)")
    add(p, "--clip-model", default=None, check=value(_check_metric_model),
        help="CLIP ViT-B/32: hub id[@rev] or local folder (default: openai/clip-vit-base-patch32)")
    add(p, "--out", check=value(check_output_dir),
        help="run folder; re-running the same command resumes (required, except for 'compare')")
    add(p, "--label", help="row name in tables (default: model + LoRA + ablation)")
    add(p, "--height", type=HEIGHT, default=512, help=f"output height ({HEIGHT.describe()})")
    add(p, "--width", type=WIDTH, default=512, help=f"output width ({WIDTH.describe()})")
    add(p, "--steps", type=STEPS, default=28, help=f"denoising steps ({STEPS.describe()})")
    add(p, "--guidance", type=GUIDANCE, default=3.5, help=f"FLUX guidance scale ({GUIDANCE.describe()})")
    add(p, "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
        help="weights dtype of a --model (presets keep their own, fp32)")
    add(p, "--quantize", choices=quant.QUANTIZE_CHOICES, default="none", metavar=quant.METAVAR, help=quant.HELP,
        check=value(check_quantize))
    add_attention(p)
    add_threads(p)
    add(p, "--metrics-batch-size", type=METRICS_BATCH, default=32,
        help=f"images per metric model batch ({METRICS_BATCH.describe()})")
    add(p, "--skip-metrics", action="store_true", help="only generate images and grids")
    add(p, "--no-grids", action="store_true", help="do not write per-case image grids")
    # One entry point for both forms: which parser's set_defaults wins for nested subparsers has
    # changed between Python releases, so dispatch on the subcommand name instead.
    p.set_defaults(func=eval_command)
    sub = p.add_subparsers(dest="eval_command", metavar="compare", help="instead of a run: compare finished runs")
    c = sub.add_parser("compare", help="one Table-1 table across evaluation folders", formatter_class=HelpFormatter)
    add(c, "dirs", nargs="+", check=each(check_input_dir), help="run folders written by 'musar eval'")


def _check_model(spec: str) -> None:
    from musar.cli.generate import _check_model as check  # one rule for --model in every command

    check(spec)


def check_quantize(spec: str) -> None:
    from musar.cli.generate import check_quantize as check

    check(spec)


def _check_data(path: str) -> None:
    if not Path(path).expanduser().exists():
        raise MusarError(f"not found: {path}")


def _check_seeds(seeds: list[int], args: argparse.Namespace) -> None:
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise MusarError(f"seeds repeat: {repeated}")


def _check_metric_model(spec: str) -> None:
    check_model_source(spec, "metric model", marker="config.json")


def eval_command(args: argparse.Namespace) -> int:
    if getattr(args, "eval_command", None) == "compare":
        return compare_command(args)
    return run_command(args)


def compare_command(args: argparse.Namespace) -> int:
    from musar.eval.report import compare

    print(compare(args.dirs), end="")
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch

    import musar

    lora = Path(args.lora).expanduser().resolve() if args.lora else None  # checked by --lora's rule
    return {
        "protocol": args.protocol,
        "data": str(Path(args.data).expanduser().resolve()),
        "model": args.model,
        "preset": args.preset,
        "lora": str(lora) if lora else None,
        "lora_sha256": file_sha256(lora) if lora else None,
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
        **({"quantize": args.quantize} if args.quantize != "none" else {}),
        **ablation.load_kwargs,
    )

    def generate(prompt: str, subjects: list[tuple[Image.Image, str]], seed: int) -> Image.Image:
        result = pipe(
            prompt=prompt,
            subjects=subjects,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(seed),
            attention=args.attention,
            progress=False,  # the runner shows its own progress bar
            **ablation.call_kwargs,
        )
        return result.images[0]

    return generate


def run_command(args: argparse.Namespace) -> int:
    # Every option was checked by musar.cli.args.validate; now the cross-option rules, then the
    # cases, all before anything is created under --out or any model loads.
    missing = [
        flag
        for flag, value in (("--protocol", args.protocol), ("--data", args.data), ("--out", args.out))
        if not value
    ]
    if missing:
        raise MusarError(f"{', '.join(missing)} required (or use 'musar eval compare DIR...')")
    cases = build_cases(args.protocol, args.data, args.limit)
    from musar.utils.images import open_image

    for path in sorted({p for case in cases for s in case.subjects for p in (s.image, *s.metric_references)}):
        # Decoded in full, once (about a second for DreamBench): a bomb, a non-image or a truncated
        # file fails now, not hours into the run. The pixel limit is checked from the header first.
        open_image(path).close()
    preflight(args, cases)
    settings = _settings(args)
    # The threads in force are recorded in summary.json; they are resume-free
    # (musar.eval.runner.RESUME_FREE_SETTINGS), so a run may continue with other --threads.
    with torch_threads(args.threads) as threads:
        return _evaluate(args, cases, {**settings, **threads})


def preflight(args: argparse.Namespace, cases: list[Any]) -> None:
    """Every case through the checks that need the model, from its configs and T5 tokenizer alone
    (musar.cli.preflight): each case's phrases as the pipeline will find them, the LoRA and GGUF
    files against its transformer, the memory of the largest case. Before any model loads."""
    from musar.cli.generate import FLUX_DEFAULTS  # what build_generator's pipeline calls use
    from musar.cli.preflight import check_generation_run
    from musar.pipelines.preload import check_case_spans, model_facts

    prompt_tokens, phrase_tokens = int(FLUX_DEFAULTS["max_sequence_length"]), int(FLUX_DEFAULTS["phrase_tokens"])
    facts = model_facts(args.model, args.preset)
    check_case_spans(facts, cases, prompt_tokens)
    if args.lora and args.ablation == "single-lora":
        _check_single_lora(args.lora)
    check_generation_run(
        facts, height=args.height, width=args.width, refs=max(len(c.subjects) for c in cases),
        condition_size=int(FLUX_DEFAULTS["condition_size"]), prompt_tokens=prompt_tokens, phrase_tokens=phrase_tokens,
        dtype=args.dtype, quantize=args.quantize, lora=args.lora, lower="--height/--width", offload_flag=False,
    )


def _check_single_lora(lora: str) -> None:
    """The single-lora ablation needs a LoRA trained with mode 'shared'; its header says which."""
    from musar.utils.safe_load import parse_json
    from musar.utils.tensorfile import read_header

    config = parse_json(read_header(lora, "LoRA file").metadata.get("lora_config", "{}"), "the LoRA config", expect=dict)
    mode = config.get("mode", "dual")
    if mode != "shared":
        raise MusarError(f"the single-lora ablation needs a LoRA trained with mode 'shared' (got {mode})")


def _evaluate(args: argparse.Namespace, cases: list[Any], settings: dict[str, Any]) -> int:
    from musar.eval.runner import check_settings, run_eval  # torch-heavy; keep `musar --help` fast
    from musar.utils import run_lock

    # The folder is this run's from here on; a run with other generation settings (--steps, the
    # model, the LoRA, ...) is refused now, before any model loads.
    with run_lock.hold(args.out, "evaluation"):
        check_settings(args.out, settings)
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
    replaced = f" ({result.replaced} of them replacing images of an edited case)" if result.replaced else ""
    print(f"{result.generated} images generated{replaced}, {result.reused} reused; report in {args.out}")
    return 0
