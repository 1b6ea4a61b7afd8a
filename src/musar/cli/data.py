"""``musar data preview`` and ``musar data stats``.

``--source`` is a local parquet file/folder (Subjects200K or MUSAR-Gen schema, detected from the
columns) or a hub dataset id. For hub ids, ``preview`` streams only the first ``--limit`` rows
(default 1000) instead of downloading the whole dataset.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from musar.cli.args import HelpFormatter, add, value
from musar.data.defaults import DEFAULT_PADDING, DEFAULT_QUALITY_THRESHOLD, SUBJECTS200K_HUB_ID
from musar.errors import MusarError
from musar.utils.io import check_writable
from musar.utils.validation import COUNT, PREVIEW_SAMPLES, TRAIN_SEED

HUB_PREVIEW_LIMIT = 1000


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        default=SUBJECTS200K_HUB_ID,
        help="local parquet file/folder or hub dataset id",
    )
    p.add_argument(
        "--limit", type=COUNT, default=None,
        help=f"read only the first N rows, streaming hub data (default: all; 'preview' of a hub id: {HUB_PREVIEW_LIMIT})",
    )
    p.add_argument(
        "--quality",
        type=int,
        default=DEFAULT_QUALITY_THRESHOLD,
        help="keep rows whose every quality score is >= this",
    )
    p.add_argument(
        "--padding",
        type=_padding,
        default="auto",
        help=f"padding around each view in the pair images, px, or 'auto': {DEFAULT_PADDING} px at "
             "Subjects200K's 528 px height, scaled to each image (1 px for the toy world's 66 px pairs)",
    )
    p.add_argument("--cache-dir", default=None, help="datasets cache folder (default: the HF cache)")


def add_parser(subparsers: Any) -> None:
    """Register ``musar data {preview,stats}``."""
    data = subparsers.add_parser("data", help="inspect the training data", description=__doc__, formatter_class=HelpFormatter)
    sub = data.add_subparsers(dest="data_command", required=True, help="what to do with the data")

    p = sub.add_parser("preview", help="write a contact sheet and samples.jsonl of one curriculum stage",
                       formatter_class=HelpFormatter)
    _add_source_args(p)
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=1, help="curriculum stage")
    # COUNT first, so 0 reads "must be >= 1" as everywhere; the cap bounds the sheet's memory.
    add(p, "--n", type=COUNT, default=8, check=value(PREVIEW_SAMPLES.check),
        help=f"number of samples ({PREVIEW_SAMPLES.describe()})")
    p.add_argument("--out", required=True, help="output folder")
    add(p, "--seed", type=int, default=0, check=value(TRAIN_SEED.check),
        help=f"random seed of the sample draw ({TRAIN_SEED.describe()})")
    p.set_defaults(func=run_preview)

    p = sub.add_parser("stats", help="print row counts after filtering, overall and per category",
                       formatter_class=HelpFormatter)
    _add_source_args(p)
    p.add_argument(
        "--check-images", action="store_true", help="also decode every image to count corrupt ones"
    )
    p.set_defaults(func=run_stats)


def _padding(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of pixels, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def _open(args: argparse.Namespace, limit: int | None) -> Any:
    from musar.data.preview import open_source

    return open_source(
        args.source,
        limit=limit,
        cache_dir=args.cache_dir,
        quality_threshold=args.quality,
        padding=None if args.padding == "auto" else args.padding,
    )


def run_preview(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise MusarError(f"--out is a file, not a folder: {args.out}")
    check_writable(f"{args.out}/contact_sheet.png")  # fail before reading any data
    from musar.data.preview import preview_samples, write_preview
    from musar.data.subjects200k import BadRowWarning

    limit = args.limit if args.limit is not None or _is_local(args.source) else HUB_PREVIEW_LIMIT
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BadRowWarning)
        source = _open(args, limit)
        samples = preview_samples(source, args.stage, args.n, args.seed)
        sheet, jsonl = write_preview(samples, args.out)
    _print_warnings(caught)
    print(f"wrote {sheet}")
    print(f"wrote {jsonl} ({len(samples)} samples)")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from musar.data.musar_gen import MusarGen
    from musar.data.subjects200k import BadRowWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BadRowWarning)
        source = _open(args, args.limit)
        if args.check_images:
            if isinstance(source, MusarGen):
                for _ in source.iter_samples():
                    pass
            else:
                source.check_images()
            source.report.images_checked = True
    _print_warnings(caught)
    for line in source.report.lines():
        print(line)
    return 0


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
