"""See exactly what trains: a contact sheet (references | target | prompt) and samples.jsonl.

Used by ``musar data preview``; the samples come from the same :class:`CurriculumStream` the
training loop uses, pinned to one stage.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from musar.data.curriculum import CurriculumConfig, CurriculumStream
from musar.data.musar_gen import MUSAR_GEN_HUB_ID, MusarGen
from musar.data.samples import Sample
from musar.data.schema import MUSAR_GEN_COLUMNS, parquet_files
from musar.data.subjects200k import DEFAULT_PADDING, DEFAULT_QUALITY_THRESHOLD, Subjects200K
from musar.errors import MusarError
from musar.utils.io import atomic_path, atomic_write_text
from musar.utils.validation import PREVIEW_SAMPLES

CONTACT_SHEET = "contact_sheet.png"
SAMPLES_JSONL = "samples.jsonl"
_BG = (255, 255, 255)
_INK = (20, 20, 20)
_GAP = 8


def is_musar_gen_source(source: str) -> bool:
    """A local parquet with the MUSAR-Gen columns, or a hub id naming MUSAR-Gen."""
    path = Path(source).expanduser()
    if path.exists():
        try:
            names = set(pq.read_schema(parquet_files(path)[0]).names)
        except (OSError, pa.ArrowException):
            return False  # let the Subjects200K reader produce the error message
        return set(MUSAR_GEN_COLUMNS) <= names
    return source.rstrip("/").lower().endswith(MUSAR_GEN_HUB_ID.split("/")[1].lower())


def open_source(
    source: str,
    *,
    limit: int | None = None,
    cache_dir: str | None = None,
    quality_threshold: int = DEFAULT_QUALITY_THRESHOLD,
    padding: int | None = DEFAULT_PADDING,
) -> Subjects200K | MusarGen:
    """Open ``source`` as Subjects200K or MUSAR-Gen, whichever its schema (or hub id) says."""
    if is_musar_gen_source(source):
        return MusarGen.open(source, limit=limit, cache_dir=cache_dir)
    return Subjects200K.open(
        source, limit=limit, cache_dir=cache_dir, quality_threshold=quality_threshold, padding=padding
    )


def preview_samples(source: Subjects200K | MusarGen, stage: int, n: int, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples of a stage-``stage`` stream (MUSAR-Gen sources ignore the stage)."""
    if n < 1:
        raise MusarError(f"--n must be >= 1, got {n}")
    PREVIEW_SAMPLES.check(n, "--n")  # the contact sheet holds one row per sample, in memory
    cfg = CurriculumConfig()
    if isinstance(source, MusarGen):
        stream = CurriculumStream(None, cfg, musar_gen=source, num_batches=n, stage=stage, seed=seed)
    else:
        stream = CurriculumStream(source, cfg, num_batches=n, stage=stage, seed=seed)
    return list(stream)


def _fit(image: Image.Image, height: int) -> Image.Image:
    width = max(1, round(image.width * height / image.height))
    return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


def contact_sheet(samples: Sequence[Sample], thumb: int = 160, text_width: int = 420) -> Image.Image:
    """One row per sample: its references, a separator, its target, then the wrapped prompt."""
    font = ImageFont.load_default()
    rows: list[tuple[list[Image.Image], Image.Image, list[str]]] = []
    for i, s in enumerate(samples):
        if s.target is None:
            raise ValueError("cannot preview a sample without a target")
        header = f"#{i} stage {s.meta.get('stage', '?')} {s.meta.get('batch_kind', s.meta.get('kind', ''))}"
        body = f"phrases: {' | '.join(s.phrases)}\nprompt: {s.prompt}"
        rows.append(([_fit(r, thumb) for r in s.references], _fit(s.target, thumb), [header, body]))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    char_w = max(1.0, probe.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    chars = max(10, int(text_width / char_w))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 3
    images_w = max(sum(r.width + _GAP for r in refs) + 3 * _GAP + tgt.width for refs, tgt, _ in rows)
    width = _GAP + images_w + text_width + _GAP
    texts = [
        [w for part in lines for para in part.split("\n") for w in textwrap.wrap(para, chars) or [""]]
        for *_, lines in rows
    ]
    heights = [max(thumb, len(t) * line_h) + _GAP for t in texts]
    sheet = Image.new("RGB", (width, _GAP + sum(heights)), _BG)
    draw = ImageDraw.Draw(sheet)
    y = _GAP
    for (refs, target, _), text, h in zip(rows, texts, heights):
        x = _GAP
        for ref in refs:
            sheet.paste(ref, (x, y))
            x += ref.width + _GAP
        draw.line((x + _GAP // 2, y, x + _GAP // 2, y + thumb), fill=_INK, width=2)  # references | target
        x += 2 * _GAP
        sheet.paste(target, (x, y))
        tx = _GAP + images_w
        for j, line in enumerate(text):
            draw.text((tx, y + j * line_h), line, fill=_INK, font=font)
        y += h
    return sheet


def write_preview(
    samples: Sequence[Sample], out_dir: str | os.PathLike[str], thumb: int = 160
) -> tuple[Path, Path]:
    """Write ``contact_sheet.png`` and ``samples.jsonl`` (atomically) under ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MusarError(f"--out is a file, not a folder: {out}")
    sheet_path, jsonl_path = out / CONTACT_SHEET, out / SAMPLES_JSONL
    sheet = contact_sheet(samples, thumb=thumb)
    with atomic_path(sheet_path) as tmp:
        sheet.save(tmp, format="PNG")
    atomic_write_text(
        jsonl_path, "".join(json.dumps(s.to_json(), sort_keys=True, default=str) + "\n" for s in samples)
    )
    return sheet_path, jsonl_path
