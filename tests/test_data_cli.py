"""``musar data preview`` / ``musar data stats`` through the real ``musar.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from musar import cli

import data_fixtures as fx


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.write_subjects(tmp_path_factory.mktemp("cli") / "train.parquet")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert rc == 2
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_preview_writes_sheet_and_jsonl(
    parquet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "preview"
    argv = ["data", "preview", "--source", str(parquet), "--stage", "2", "--n", "5", "--out", str(out)]
    rc, stdout, err = run([*argv, "--seed", "3", "--cache-dir", str(tmp_path / "c")], capsys)
    assert rc == 0, err
    assert "contact_sheet.png" in stdout
    assert "row ids: 11, 12" in err  # bad rows are reported, not fatal
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 300 and sheet.height > 5 * 100
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 5
    assert all(r["meta"]["stage"] == 2 and r["num_conditions"] in (1, 2) for r in records)
    assert all(len(r["phrases"]) == r["num_conditions"] for r in records)
    again = tmp_path / "again"
    rc, *_ = run([*argv[:-1], str(again), "--seed", "3", "--cache-dir", str(tmp_path / "c")], capsys)
    assert rc == 0 and (again / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()


def test_preview_of_musar_gen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = fx.write_musar_gen(tmp_path / "mg.parquet")
    rc, _, err = run(
        [
            "data",
            "preview",
            "--source",
            str(src),
            "--n",
            "2",
            "--out",
            str(tmp_path / "o"),
            "--cache-dir",
            str(tmp_path),
        ],
        capsys,
    )
    assert rc == 0, err
    lines = (tmp_path / "o" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["meta"]["kind"] for x in lines] == ["musar_gen", "musar_gen"]


def test_stats(parquet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(
        ["data", "stats", "--source", str(parquet), "--check-images", "--cache-dir", str(tmp_path)], capsys
    )
    assert rc == 0
    lines = out.splitlines()
    for expected in (
        "rows: 13",
        "kept: 9",
        "low quality: 2",
        "missing fields: 2",
        "corrupt images: 1",
        "  dog: 3",
    ):
        assert expected in lines
    rc, out, _ = run(
        ["data", "stats", "--source", str(parquet), "--quality", "4", "--cache-dir", str(tmp_path)], capsys
    )
    assert rc == 0 and "kept: 11" in out.splitlines()
    # without --check-images no image was decoded: the count is not claimed
    assert "corrupt images: not checked (0 seen so far; --check-images decodes every image)" in out.splitlines()


def test_bad_inputs_exit_2_with_one_line(
    parquet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(["data", "stats", "--source", str(tmp_path / "missing.parquet")], capsys)
    assert_one_line_error(rc, err, "no such file")

    pq.write_table(pa.table({"image": [b"x"], "collection": ["c"]}), tmp_path / "wrong.parquet")
    rc, _, err = run(["data", "stats", "--source", str(tmp_path / "wrong.parquet")], capsys)
    assert_one_line_error(rc, err, "missing column(s) quality_assessment, description")

    out = ["--out", str(tmp_path / "o")]
    rc, _, err = run(["data", "preview", "--source", str(parquet), "--stage", "4", *out], capsys)
    assert_one_line_error(rc, err, "invalid choice")
    rc, _, err = run(["data", "preview", "--source", str(parquet), "--n", "0", *out], capsys)
    assert_one_line_error(rc, err, "must be >= 1")

    (tmp_path / "file").write_text("x")
    rc, _, err = run(["data", "preview", "--source", str(parquet), "--out", str(tmp_path / "file")], capsys)
    assert_one_line_error(rc, err, "not a folder")


def test_auto_padding_reads_each_pair_at_its_own_scale() -> None:
    from musar.data.subjects200k import view_boxes

    assert view_boxes(1056, 528, None) == view_boxes(1056, 528, 8)  # Subjects200K's published layout
    assert view_boxes(132, 66, None) == ((1, 1, 65, 65), (67, 1, 131, 65))  # toy pairs: 64 px views, 1 px pad
    # 8 px on a toy pair also fits the geometry (width is always twice the height), but crops each
    # 64 px view to 50 px: the reason the CLI's default is auto
    assert view_boxes(132, 66, 8)[0] == (8, 8, 58, 58)


def test_preview_of_toy_pairs_keeps_whole_views(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from musar.data.preview import open_source

    rc, _, err = run(["data", "preview", "--source", "examples/data/toy_pairs.parquet", "--n", "1",
                      "--out", str(tmp_path / "p"), "--cache-dir", str(tmp_path / "c")], capsys)
    assert rc == 0, err
    # what the CLI's default (auto) reads: the whole 64 px views
    source = open_source("examples/data/toy_pairs.parquet", limit=None, cache_dir=str(tmp_path / "c"),
                         quality_threshold=5, padding=None)
    pair = source.pair(0)
    assert pair is not None and [v.size for v in pair.views] == [(64, 64), (64, 64)]
