"""On-disk schemas of the training sources and writers that produce parquet in exactly that shape.

The Subjects200K schema mirrors the published ``Yuanshi/Subjects200K`` parquet (encoded image bytes
plus two nested struct columns), so fixtures, toy worlds and the real dataset go through the same
reader. The MUSAR-Gen schema mirrors ``guozinan/MUSAR-Gen``.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from musar.errors import MusarError
from musar.utils.io import atomic_path

QUALITY_KEYS: tuple[str, ...] = ("compositeStructure", "objectConsistency", "imageQuality")
# The fields the readers need; the published parquet also carries a bool ``description_valid``.
DESCRIPTION_KEYS: tuple[str, ...] = ("item", "category", "description_0", "description_1")

SUBJECTS200K_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "collection": datasets.Value("string"),
        "quality_assessment": {k: datasets.Value("int64") for k in QUALITY_KEYS},
        # Field order as published: item, description_0, description_1, category, description_valid.
        "description": {
            "item": datasets.Value("string"),
            "description_0": datasets.Value("string"),
            "description_1": datasets.Value("string"),
            "category": datasets.Value("string"),
            "description_valid": datasets.Value("bool"),
        },
    }
)
SUBJECTS200K_COLUMNS: tuple[str, ...] = tuple(SUBJECTS200K_FEATURES)

MUSAR_GEN_IMAGE_COLUMNS: tuple[str, ...] = ("cond_img_0", "cond_img_1", "tgt_img")
MUSAR_GEN_TEXT_COLUMNS: tuple[str, ...] = ("cond_prompt_0", "cond_prompt_1", "prompt")
MUSAR_GEN_FEATURES = datasets.Features(
    {
        **{k: datasets.Image() for k in MUSAR_GEN_IMAGE_COLUMNS},
        **{k: datasets.Value("string") for k in MUSAR_GEN_TEXT_COLUMNS},
    }
)
MUSAR_GEN_COLUMNS: tuple[str, ...] = tuple(MUSAR_GEN_FEATURES)


def encode_image(value: Any, fmt: str = "PNG") -> dict[str, Any] | None:
    """Turn a PIL image, raw bytes or an ``{"bytes", "path"}`` dict into the parquet image struct.

    Raw bytes are stored untouched (even if undecodable) so tests can write corrupt rows on purpose.
    """
    if value is None:
        return None
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format=fmt)
        return {"bytes": buf.getvalue(), "path": None}
    if isinstance(value, bytes | bytearray):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    raise MusarError(f"cannot encode image of type {type(value).__name__}; pass a PIL image or bytes")


def _write_parquet(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    features: datasets.Features,
    image_columns: Sequence[str],
) -> Path:
    # Missing keys become nulls instead of errors: the readers must cope with such rows anyway,
    # and fixtures need to be able to write them.
    rows: list[dict[str, Any]] = []
    for rec in records:
        row = {name: rec.get(name) for name in features}
        for col in image_columns:
            row[col] = encode_image(row[col])
        desc = row.get("description")
        if isinstance(desc, Mapping) and "description_valid" in features.get("description", {}):
            row["description"] = {"description_valid": True, **desc}
        rows.append(row)
    # Dataset.from_list casts to the exact features and stores them in the schema metadata, like
    # the hub's parquet; pyarrow writes it without datasets' progress bars.
    table = datasets.Dataset.from_list(rows, features=features).data.table
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_subjects200k_parquet(records: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``records`` as one parquet file in the published Subjects200K schema.

    Each record: ``image`` (PIL image or encoded bytes, 1056x528 for the real layout),
    ``collection`` (str), ``quality_assessment`` (dict of the three int scores) and
    ``description`` (dict with item, category, description_0, description_1 and optionally
    description_valid, which defaults to True). Missing keys are written as nulls, so fixtures can
    produce the broken rows the readers must skip. Returns ``path``.
    """
    return _write_parquet(records, path, SUBJECTS200K_FEATURES, ("image",))


def write_musar_gen_parquet(records: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``records`` as one parquet file in the MUSAR-Gen schema.

    Each record: ``cond_img_0``, ``cond_img_1``, ``tgt_img`` (PIL images or encoded bytes) and the
    strings ``cond_prompt_0``, ``cond_prompt_1`` (subject phrases) and ``prompt``. Returns ``path``.
    """
    return _write_parquet(records, path, MUSAR_GEN_FEATURES, MUSAR_GEN_IMAGE_COLUMNS)


# --- reading -------------------------------------------------------------------------------------

# Columns a reader needs, with the struct fields it needs inside them (extra fields are fine).
SUBJECTS200K_REQUIRED: dict[str, tuple[str, ...]] = {
    "image": (),
    "collection": (),
    "quality_assessment": QUALITY_KEYS,
    "description": DESCRIPTION_KEYS,
}
MUSAR_GEN_REQUIRED: dict[str, tuple[str, ...]] = {name: () for name in MUSAR_GEN_COLUMNS}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def missing_columns(
    fields: Mapping[str, Sequence[str] | None], required: Mapping[str, Sequence[str]]
) -> list[str]:
    """Names (``col`` or ``col.sub``) in ``required`` that ``fields`` (column -> struct fields) lacks."""
    missing: list[str] = []
    for col, subs in required.items():
        if col not in fields:
            missing.append(col)
            continue
        have = set(fields[col] or ())
        missing += [f"{col}.{s}" for s in subs if s not in have]
    return missing


def arrow_fields(schema: pa.Schema) -> dict[str, list[str] | None]:
    return {
        f.name: [f.type.field(i).name for i in range(f.type.num_fields)]
        if pa.types.is_struct(f.type)
        else None
        for f in schema
    }


def feature_fields(features: Mapping[str, Any]) -> dict[str, list[str] | None]:
    return {name: list(feat) if isinstance(feat, dict) else None for name, feat in features.items()}


def check_schema(
    fields: Mapping[str, Sequence[str] | None], required: Mapping[str, Sequence[str]], source: str
) -> None:
    """Fail at once, naming every missing column, instead of on the first bad row mid-epoch."""
    missing = missing_columns(fields, required)
    if missing:
        raise MusarError(
            f"{source} does not have the expected schema: missing column(s) {', '.join(missing)}"
        )


def parquet_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise MusarError(f"no parquet files in {path}")
    return files


def load_source(
    source: str | os.PathLike[str],
    required: Mapping[str, Sequence[str]],
    image_columns: Sequence[str],
    *,
    split: str = "train",
    cache_dir: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """Open a local parquet file/folder or a hub dataset id as a map-style ``datasets.Dataset``.

    Image columns stay encoded (``decode=False``) so the readers decode them and can skip a corrupt
    one instead of crashing. With ``limit`` only the first rows are read, by streaming. Any problem
    the user can fix (no such path, offline hub, wrong schema) raises :class:`MusarError`.
    """
    name = str(source)
    path = Path(source).expanduser()
    if path.exists():
        files = parquet_files(path)
        for f in files:
            try:
                check_schema(arrow_fields(pq.read_schema(f)), required, str(f))
            except (OSError, pa.ArrowException) as e:
                raise MusarError(f"{f} is not a readable parquet file: {e}") from None
        args: dict[str, Any] = {"path": "parquet", "data_files": [str(f) for f in files], "split": "train"}
    elif _HUB_ID.match(name) and not name.startswith("."):
        args = {"path": name, "split": split}
    else:
        raise MusarError(f"no such file or folder, and not a hub dataset id: {name}")
    try:
        ds = datasets.load_dataset(**args, cache_dir=cache_dir, streaming=limit is not None)
    except MusarError:
        raise
    except Exception as e:  # offline, unknown id, unreadable file: all fixable by the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MusarError(f"cannot load {name}: {first}") from None
    if limit is not None:
        # Decoding off before iterating: a corrupt image in the first rows must not abort the read.
        head = list(ds.decode(False).take(limit))
        if ds.features is None:  # some hub datasets stream without declared features
            fields = {k: list(v) if isinstance(v, dict) else None for k, v in head[0].items()} if head else {}
            check_schema(fields, required, name)
            return datasets.Dataset.from_list(head)
        features = _undecoded(ds.features, image_columns)
        check_schema(feature_fields(features), required, name)
        return datasets.Dataset.from_list(head, features=features)
    check_schema(feature_fields(ds.features), required, name)
    for col in image_columns:
        if isinstance(ds.features.get(col), datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))  # metadata-only cast, no rewrite
    return ds


def column_table(ds: datasets.Dataset, columns: Sequence[str]) -> pa.Table:
    """The arrow table of ``columns`` in row order, without decoding or copying other columns."""
    sub = ds.select_columns(list(columns))
    # A selected/shuffled Dataset keeps an indices mapping over its arrow data; flattening just
    # these columns is cheap. Our own loader never produces one.
    if getattr(sub, "_indices", None) is not None:
        sub = sub.flatten_indices()
    return sub.data.table


def _undecoded(features: datasets.Features, image_columns: Sequence[str]) -> datasets.Features:
    out = features.copy()
    for col in image_columns:
        if isinstance(out.get(col), datasets.Image):
            out[col] = datasets.Image(decode=False)
    return out
