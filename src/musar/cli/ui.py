"""``musar ui``: serve the Gradio app on this machine (127.0.0.1 unless ``--host`` says otherwise).

Cheap checks (Gradio installed, port free, output folder writable) run before the model load, so
a typo costs a second, not a FLUX load. Also runnable as ``python -m musar.cli ui [options]``.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from musar.errors import MusarError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="web UI (Gradio) for multi-subject generation")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="hub id or local folder of FLUX.1 (default black-forest-labs/FLUX.1-dev)")
    # Free text checked by load_pipeline, so a new preset needs no change here.
    src.add_argument("--preset", default=None, help="a ready-made pipeline, e.g. 'tiny' (random weights, no download)")
    p.add_argument("--lora", default=None, help="MUSAR LoRA weights (.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs internet)")
    p.add_argument("--out-dir", default="outputs/ui", help="where each result's folder is written (default outputs/ui)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none", help="CPU offload for low VRAM")
    p.set_defaults(func=run)


def check_port(host: str, port: int) -> None:
    """Fail now, with the fix, if ``host:port`` cannot be bound."""
    if not 1 <= port <= 65535:
        raise MusarError(f"--port must be between 1 and 65535, got {port}")
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
    try:
        import gradio  # noqa: F401  (checked here so the message names the fix)
    except ImportError:
        raise MusarError("the UI needs Gradio: pip install 'musar[ui]'") from None
    from musar.utils.io import check_writable

    check_port(args.host, args.port)
    check_writable(Path(args.out_dir) / "params.json")

    from musar.pipelines.presets import load_pipeline
    from musar.pipelines.registry import get_preset
    from musar.ui.app import launch
    from musar.ui.backend import Studio
    from musar.ui.logic import ModelSource

    if args.preset and get_preset(args.preset).random_weights:
        print(f"musar: preset {args.preset!r} has RANDOM weights: images are noise, for trying the app only.", file=sys.stderr)
    print("musar: loading the model (once, before serving)...", file=sys.stderr)
    pipe = load_pipeline(model=args.model, preset=args.preset, lora=args.lora, dtype=args.dtype, offload=args.offload)
    source = ModelSource(model=args.model, preset=args.preset, lora=args.lora, dtype=args.dtype, offload=args.offload)
    studio = Studio(pipe, source, args.out_dir)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"musar: serving on {args.host}: anyone who can reach this address can use the app.", file=sys.stderr)
    launch(studio, host=args.host, port=args.port, share=args.share)
    return 0

