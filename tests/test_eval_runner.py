"""The evaluation runner with a fake generator: files, columns, resume, compare, CLI wiring."""

from __future__ import annotations

import argparse
import csv
import json
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from musar.errors import MusarError
from musar.eval.metrics import ImageScores
from musar.eval.protocols import Case, build_cases
from musar.eval.report import CASES_COLUMNS, PAPER_LABEL, compare
from musar.eval.runner import run_eval

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"
pytestmark = pytest.mark.skipif(
    not (DREAMBENCH / "prompts_and_classes.txt").is_file(),
    reason=f"DreamBench copy not found at {DREAMBENCH}",
)


class FakeGenerator:
    """Colour from seed and prompt length; counts calls; can fail after N images."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[str, int, list[str]]] = []
        self.fail_after = fail_after

    def __call__(self, prompt: str, subjects: list[tuple[Image.Image, str]], seed: int) -> Image.Image:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        assert all(isinstance(im, Image.Image) for im, _ in subjects)
        self.calls.append((prompt, seed, [phrase for _, phrase in subjects]))
        return Image.new("RGB", (32, 32), (40 * seed, len(prompt) % 256, 100))


class FakeScorer:
    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        references: Sequence[Sequence[Sequence[Path]]],
    ) -> list[ImageScores]:
        out = []
        for im, refs in zip(images, references):
            red = im.getpixel((0, 0))[0] / 255
            out.append(ImageScores(red, 0.5, 25.0 + red, tuple(red for _ in refs), tuple(0.5 for _ in refs)))
        return out

    def describe(self) -> dict[str, Any]:
        return {"scorer": "fake"}


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return build_cases("dreambench-single", DREAMBENCH, limit=2) + build_cases(
        "dreambench-multi", DREAMBENCH, limit=1
    )


def test_run_writes_everything_and_resumes(cases: list[Case], tmp_path: Path) -> None:
    out = tmp_path / "run"
    gen = FakeGenerator()
    result = run_eval(
        cases, gen, FakeScorer(), seeds=(0, 1), out_dir=out, settings={"model": "fake"}, progress=False
    )
    assert result.generated == 6 and result.reused == 0 and len(gen.calls) == 6
    assert gen.calls[-1][2] == [s.phrase for s in cases[2].subjects]
    for c in cases:
        assert (out / "grids" / f"{c.case_id}.jpg").is_file()
        for seed in (0, 1):
            assert (out / "images" / f"{c.case_id}_s{seed}.png").is_file()
    with (out / "cases.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CASES_COLUMNS
        rows = list(reader)
    assert len(rows) == 6 and {r["kind"] for r in rows} == {"single", "multi"}
    multi = next(r for r in rows if r["kind"] == "multi")
    assert multi["n_subjects"] == "2" and len(multi["dino_per_subject"].split(";")) == 2
    assert float(rows[1]["dino"]) == pytest.approx(40 / 255, abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["single"] == {"cases": 2, "images": 4}
    assert summary["settings"]["seeds"] == [0, 1] and summary["settings"]["metrics"] == {"scorer": "fake"}
    single = summary["metrics"]["single"]["clip_t"]
    assert (
        single["mean"] == pytest.approx(25 + 20 / 255)
        and single["ci95"][0] <= single["mean"] <= single["ci95"][1]
    )
    assert summary["metrics"]["multi"]["dino"]["ci95"] is None  # one case: no interval
    table = (out / "table.md").read_text()
    assert PAPER_LABEL in table and "| fake |" in table and "0.774" in table

    again = FakeGenerator()
    result = run_eval(
        cases, again, FakeScorer(), seeds=(0, 1), out_dir=out, settings={"model": "fake"}, progress=False
    )
    assert again.calls == [] and result.generated == 0 and result.reused == 6


def test_interrupted_run_resumes_and_guards_settings(cases: list[Case], tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_eval(
            cases,
            FakeGenerator(fail_after=4),
            None,
            seeds=(0, 1),
            out_dir=out,
            settings={"model": "a"},
            progress=False,
        )
    assert len(list((out / "images").glob("*.png"))) == 4
    gen = FakeGenerator()
    result = run_eval(
        cases, gen, None, seeds=(0, 1), out_dir=out, settings={"model": "a"}, grids=False, progress=False
    )
    assert len(gen.calls) == 2 and result.reused == 4
    assert (out / "cases.csv").read_text().splitlines()[1].split(",")[4] == ""  # no metrics: empty cell
    with pytest.raises(MusarError, match="model='a'"):
        run_eval(cases, gen, None, seeds=(0, 1), out_dir=out, settings={"model": "b"}, progress=False)
    with pytest.raises(MusarError, match="duplicate case id"):
        run_eval([cases[0], cases[0]], gen, None, out_dir=tmp_path / "dup", progress=False)


def test_compare_merges_single_and_multi_runs(cases: list[Case], tmp_path: Path) -> None:
    single, multi, other = tmp_path / "single", tmp_path / "multi", tmp_path / "other"
    kw: dict[str, Any] = {"seeds": (0,), "progress": False, "grids": False}
    run_eval(cases[:2], FakeGenerator(), FakeScorer(), out_dir=single, settings={"label": "full"}, **kw)
    run_eval(cases[2:], FakeGenerator(), FakeScorer(), out_dir=multi, settings={"label": "full"}, **kw)
    run_eval(
        cases,
        FakeGenerator(),
        FakeScorer(),
        out_dir=other,
        settings={"preset": "tiny", "ablation": "single-lora"},
        **kw,
    )
    table = compare([single, multi, other])
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Method | Single DINO | Single CLIP-T | Single CLIP-I | Multi DINO")
    assert len(lines) == 5  # header, rule, paper, merged "full", the ablation
    full = next(line for line in lines if line.startswith("| full |"))
    assert "–" not in full
    assert any(line.startswith("| preset tiny [single-lora] |") for line in lines)
    with pytest.raises(MusarError, match=r"no summary\.json"):
        compare([tmp_path])


def test_cli_with_fake_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from musar.cli import eval as cli

    seen: dict[str, Any] = {"calls": []}

    def load_pipeline(
        model: str | None, preset: str | None, lora: str | None, dtype: str, **extra: Any
    ) -> Any:
        seen["load"] = {
            "model": model,
            "preset": preset,
            "lora": lora,
            "dtype": dtype,
            **extra,
        }

        def pipe(**call: Any) -> Any:
            seen["calls"].append(call)
            return types.SimpleNamespace(
                images=[Image.new("RGB", (call["width"], call["height"]), (9, 9, 9))]
            )

        return pipe

    monkeypatch.setattr("musar.pipelines.presets.load_pipeline", load_pipeline)
    parser = argparse.ArgumentParser(prog="musar")
    cli.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    common = ["eval", "--protocol", "dreambench-multi", "--data", str(DREAMBENCH), "--preset", "tiny"]
    common += ["--limit", "1", "--seeds", "3", "--height", "64", "--width", "80", "--skip-metrics"]
    args = parser.parse_args([*common, "--ablation", "no-dynamic-routing", "--out", str(out)])
    assert args.func(args) == 0
    assert seen["load"] == {
        "model": None,
        "preset": "tiny",
        "lora": None,
        "dtype": "bf16",
    }
    (call,) = seen["calls"]
    assert (
        call["dynamic_routing"] is False
        and call["generator"].initial_seed() == 3
        and len(call["subjects"]) == 2
    )
    assert call["attention"] == "auto" and call["progress"] is False
    assert Image.open(out / "images" / "pair00-backpack+cat_s3.png").size == (80, 64)
    assert "| preset tiny [no-dynamic-routing] |" in capsys.readouterr().out

    args = parser.parse_args([*common, "--ablation", "single-lora", "--out", str(tmp_path / "x")])
    assert args.func(args) == 0 and seen["load"]["single_lora"] is True

    args = parser.parse_args(["eval", "compare", str(out)])
    assert args.func(args) == 0 and PAPER_LABEL in capsys.readouterr().out
    args = parser.parse_args(["eval", "--data", str(DREAMBENCH)])
    with pytest.raises(MusarError, match="--protocol, --out required"):
        args.func(args)
