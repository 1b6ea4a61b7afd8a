"""Subjects200K / MUSAR-Gen readers: schema, filter counts, view geometry, bad rows."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from musar.data.musar_gen import MusarGen
from musar.data.schema import SUBJECTS200K_FEATURES, write_subjects200k_parquet
from musar.data.subjects200k import BadRowWarning, Subjects200K, split_views, view_boxes
from musar.errors import MusarError

import data_fixtures as fx


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.write_subjects(tmp_path_factory.mktemp("s200k") / "train-00000.parquet")


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf-cache")


def test_fixture_is_the_published_schema(parquet: Path) -> None:
    schema = pq.read_schema(parquet)
    assert schema.names == ["image", "collection", "quality_assessment", "description"]
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert [f.name for f in schema.field("description").type] == [
        "item",
        "description_0",
        "description_1",
        "category",
        "description_valid",
    ]
    assert [f.name for f in schema.field("quality_assessment").type] == [
        "compositeStructure",
        "objectConsistency",
        "imageQuality",
    ]
    assert b"huggingface" in schema.metadata  # datasets reads the Image feature back from it
    assert SUBJECTS200K_FEATURES["image"].__class__.__name__ == "Image"


def test_filter_counts_and_bad_rows(parquet: Path, cache: str) -> None:
    with pytest.warns(BadRowWarning, match=r"missing fields \(row ids: 11, 12\)"):
        src = Subjects200K.open(str(parquet), cache_dir=cache)
    rep = src.report
    assert (rep.total, rep.kept, rep.low_quality) == (fx.N_ROWS, fx.N_GOOD + 1, len(fx.LOW_QUALITY_ROWS))
    assert rep.missing_fields == [fx.MISSING_FIELD_ROW, fx.MISSING_STRUCT_ROW]
    assert dict(rep.per_category) == {"dog": 3, "cup": 3, "plant": 2, "vase": 1}
    # The corrupt image only shows when decoded: skipped, counted, reported with its row id.
    with pytest.warns(BadRowWarning, match=rf"undecodable image \(row ids: {fx.CORRUPT_ROW}\)"):
        pairs = list(src.iter_pairs())
    assert [p.row_id for p in pairs] == list(range(fx.N_GOOD))
    assert rep.corrupt_images == [fx.CORRUPT_ROW]
    assert src.pair(src.kept.index(fx.CORRUPT_ROW)) is None  # again: no crash, no second warning


def test_threshold_and_collection_filters(parquet: Path, cache: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadRowWarning)
        assert len(Subjects200K.open(str(parquet), cache_dir=cache, quality_threshold=4)) == fx.N_GOOD + 3
        with pytest.raises(MusarError, match="no rows left"):
            Subjects200K.open(str(parquet), cache_dir=cache, collections=["collection_1"])


def test_pair_content(parquet: Path, cache: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadRowWarning)
        src = Subjects200K.open(str(parquet), cache_dir=cache)
    pair = src.pair(3)
    assert pair is not None
    assert (pair.item, pair.category) == fx.SUBJECTS[3]
    assert pair.descriptions == (f"{pair.item} on a beach", f"{pair.item} in a kitchen")
    assert [v.size for v in pair.views] == [(fx.VIEW, fx.VIEW)] * 2
    for view in (0, 1):
        assert pair.views[view].getpixel((0, 0)) == fx.view_color(3, view)
        assert pair.views[view].getpixel((fx.VIEW - 1, fx.VIEW - 1)) == fx.view_color(3, view)


def test_split_views_pixel_exact_on_published_geometry() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(528, 1056, 3), dtype=np.uint8)
    left, right = split_views(Image.fromarray(pixels), padding=8)
    assert view_boxes(1056, 528, 8) == ((8, 8, 520, 520), (536, 8, 1048, 520))
    np.testing.assert_array_equal(np.asarray(left), pixels[8:520, 8:520])
    np.testing.assert_array_equal(np.asarray(right), pixels[8:520, 536:1048])


@pytest.mark.parametrize(("pad", "size"), [(0, 512), (16, 64), (3, 10)])
def test_split_views_padding_parameter(pad: int, size: int) -> None:
    w, h = 2 * size + 4 * pad, size + 2 * pad
    pixels = np.random.default_rng(pad).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    left, right = split_views(Image.fromarray(pixels), padding=pad)
    np.testing.assert_array_equal(np.asarray(left), pixels[pad : pad + size, pad : pad + size])
    np.testing.assert_array_equal(
        np.asarray(right), pixels[pad : pad + size, size + 3 * pad : 2 * size + 3 * pad]
    )


def test_split_views_rejects_other_geometry() -> None:
    with pytest.raises(ValueError, match="not two square views"):
        split_views(Image.new("RGB", (1024, 528)), padding=8)


def test_wrong_schema_names_missing_columns(tmp_path: Path, cache: str) -> None:
    table = pa.table(
        {
            "image": [{"bytes": b"", "path": None}],
            "description": [{"item": "a dog", "description_0": "x", "description_1": "y"}],
        }
    )
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(MusarError) as err:
        Subjects200K.open(str(tmp_path / "bad.parquet"), cache_dir=cache)
    msg = str(err.value)
    assert "collection" in msg and "quality_assessment" in msg and "description.category" in msg
    assert "\n" not in msg


def test_missing_source_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(MusarError, match="no such file"):
        Subjects200K.open(str(tmp_path / "nope.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MusarError, match="no parquet files"):
        Subjects200K.open(str(tmp_path / "empty"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(MusarError, match="not a readable parquet"):
        Subjects200K.open(str(tmp_path / "junk.parquet"))


def test_folder_and_limit(tmp_path: Path, cache: str) -> None:
    records = fx.subjects_records()
    write_subjects200k_parquet(records[:4], tmp_path / "d" / "train-00000.parquet")
    write_subjects200k_parquet(records[4:8], tmp_path / "d" / "train-00001.parquet")
    src = Subjects200K.open(str(tmp_path / "d"), cache_dir=cache)
    assert src.report.total == 8 and [src.row_id(k) for k in range(len(src))] == list(range(8))
    head = Subjects200K.open(str(tmp_path / "d"), limit=5, cache_dir=cache)  # streamed, no arrow cache
    assert head.report.total == 5 and head.pair(4) is not None


def test_musar_gen_reader(tmp_path: Path, cache: str) -> None:
    path = fx.write_musar_gen(tmp_path / "mg.parquet", n=3)
    with pytest.warns(BadRowWarning, match=r"missing fields \(row ids: 4\)"):
        mg = MusarGen.open(str(path), cache_dir=cache)
    assert (mg.report.total, len(mg)) == (5, 4)
    with pytest.warns(BadRowWarning, match=r"undecodable image \(row ids: 3\)"):
        samples = list(mg.iter_samples())
    assert len(samples) == 3 and mg.report.corrupt_images == [3]
    s = samples[1]
    assert s.num_conditions == 2 and s.phrases == ["a corgi", "a red mug"]
    assert s.prompt == "a corgi next to a red mug, scene 1" and s.target.size == (48, 48)
    assert all(r.mode == "RGB" for r in s.references)
    with pytest.raises(MusarError, match="missing column"):
        MusarGen.open(str(fx.write_subjects(tmp_path / "s.parquet")), cache_dir=cache)
