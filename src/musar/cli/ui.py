"""``musar ui``: serve the Gradio app on this machine (127.0.0.1 unless ``--host`` says otherwise).

Every argument is checked (port free, output folder writable, LoRA header, preset known) before
Gradio is imported or the model loads, so a typo costs a second, not a FLUX load. Also runnable as ``python -m musar.cli ui [options]``.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys

from musar.cli.args import HelpFormatter, add, add_threads, torch_threads, value
from musar.errors import MusarError
from musar.pipelines import quantization_spec as quant
from musar.utils.validation import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS,
    PORT,
    check_lora_file,
    check_model_source,
    check_output_dir,
    check_preset_name,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="web UI (Gradio) for multi-subject generation", formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    add(src, "--model", default=None, check=value(check_model_source),
        help="hub id or local folder of FLUX.1 (default: black-forest-labs/FLUX.1-dev unless --preset)")
    add(src, "--preset", default=None, check=value(check_preset_name),
        help="a registered preset instead of --model, e.g. 'tiny' (random weights, no download) (default: none)")
    add(p, "--lora", default=None, check=value(check_lora_file),
        help="MUSAR LoRA weights (.safetensors) (default: none; a preset's own where it has one)")
    add(p, "--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    add(p, "--port", type=PORT, default=7860, check=_check_port, help=f"port to serve on ({PORT.describe()}, free)")
    add(p, "--share", action="store_true", help="also open a public Gradio share link (needs internet)")
    add(p, "--out-dir", default="outputs/ui", check=value(lambda d: check_output_dir(d, ["params.json"])),
        help="where each result's folder is written")
    add(p, "--max-image-pixels", type=MAX_IMAGE_PIXELS, default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"refuse uploaded references above this many pixels (at most {MAX_IMAGE_PIXELS.hi:,})")
    add(p, "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
        help="weights dtype of a --model (presets keep their own, fp32)")
    add(p, "--offload", choices=["none", "model", "sequential"], default="none", help="CPU offload for low VRAM")
    add(p, "--quantize", choices=quant.QUANTIZE_CHOICES, default="none", metavar=quant.METAVAR, help=quant.HELP,
        check=value(quant.check_quantize_arg))
    add_threads(p)
    p.set_defaults(func=run)


def _check_port(port: int, args: argparse.Namespace) -> None:
    check_port(args.host, port)


def check_port(host: str, port: int) -> None:
    """Fail now, with the fix, if ``host:port`` cannot be bound."""
    PORT.check(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MusarError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise MusarError(f"port {port} on {host} is in use; pick another with --port") from None
            raise MusarError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> int:
    # Every argument (port free, output folder writable, LoRA header, preset) was checked by
    # musar.cli.args.validate; the Gradio check stays here so --help never imports it.
    try:
        import gradio  # noqa: F401  (checked here so the message names the fix)
    except ImportError:
        raise MusarError("the UI needs Gradio: pip install 'musar[ui]'") from None
    from musar.utils import images

    images.MAX_IMAGE_PIXELS = args.max_image_pixels

    from musar.pipelines.presets import load_pipeline
    from musar.ui.app import launch
    from musar.ui.backend import Studio
    from musar.ui.logic import ModelSource
    from musar.utils.registry import get_preset

    if args.preset and get_preset(args.preset).random_weights:
        print(f"musar: preset {args.preset!r} has RANDOM weights: images are noise, for trying the app only.", file=sys.stderr)
    print("musar: loading the model (once, before serving)...", file=sys.stderr)
    settings = dict(model=args.model, preset=args.preset, lora=args.lora, dtype=args.dtype, offload=args.offload, quantize=args.quantize)
    with torch_threads(args.threads) as threads:  # for as long as the app serves
        print(f"musar: {threads['threads']} torch threads ({threads['interop_threads']} inter-op)", file=sys.stderr)
        pipe = load_pipeline(**settings)
        source = ModelSource(**settings)
        studio = Studio(pipe, source, args.out_dir)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"musar: serving on {args.host}: anyone who can reach this address can use the app.", file=sys.stderr)
        launch(studio, host=args.host, port=args.port, share=args.share)
    return 0



if __name__ == "__main__":  # `python -m musar.cli.ui [options]`, as the browser test starts the app
    from musar.cli import main

    sys.exit(main(["ui", *sys.argv[1:]]))
