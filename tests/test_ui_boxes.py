"""Layout boxes in the web UI: the box fields, their messages, the preview, the CLI command box."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from musar import cli
from musar.models.boxes import parse_box_args
from musar.pipelines.routing_maps import PALETTE
from musar.ui.backend import Studio
from musar.ui.logic import ModelSource, Problem, Request, box_preview, check_request, cli_command

PROMPT = "a photo of a dog and a red backpack on the beach"


@pytest.fixture
def refs(tmp_path: Path) -> tuple[str, str]:
    a, b = tmp_path / "dog.png", tmp_path / "backpack.png"
    Image.new("RGB", (48, 40), (200, 40, 40)).save(a)
    Image.new("RGB", (40, 56), (40, 40, 200)).save(b)
    return str(a), str(b)


def check(rows: list, boxes: list, **overrides: Any) -> tuple[Request | None, list[Problem]]:
    values: dict[str, Any] = {"height": 128, "width": 256, "steps": 2, "guidance": 3.5, "seed": 5} | overrides
    return check_request(PROMPT, rows, boxes=boxes, **values)


def test_box_fields_become_request_boxes(refs: tuple[str, str]) -> None:
    rows = [(refs[0], "a dog"), (None, ""), (refs[1], "a red backpack")]
    request, problems = check(rows, ["0 0 0.5 1", "", "(0.5, 0.25, 1, 0.75)"], outside_boxes="none")
    assert problems == [] and request is not None
    assert request.boxes == ((0.0, 0.0, 0.5, 1.0), (0.5, 0.25, 1.0, 0.75))  # the blank row is skipped
    assert request.outside_boxes == "none"
    request, _ = check(rows, ["", "", "0.5 0 1 1"])
    assert request is not None and request.boxes == (None, (0.5, 0.0, 1.0, 1.0))
    request, _ = check(rows, ["", "", " "])
    assert request is not None and request.boxes is None


@pytest.mark.parametrize(
    ("boxes", "overrides", "expected"),
    [
        (["0 0 1.5 1", ""], {}, [(0, "box (0, 0, 1.5, 1): coordinates are fractions of the image in [0, 1], got 1.5")]),
        (["", "0.5 0 0.4 1"], {}, [(1, "x1 must be greater than x0")]),
        (["0 0 0.05 1", "0 0 1 0.1"], {}, [(0, "smaller than one 16x16 px token"), (1, "smaller than one 16x16 px token")]),
        (["0 0 half 1", ""], {}, [(0, "a box is 4 numbers x0 y0 x1 y1")]),
        (["0 0 0.5 1", ""], {"dynamic_routing": False}, [(None, "boxes steer dynamic routing, which is switched off")]),
        (["", ""], {"outside_boxes": "none"}, [(None, "outside_boxes='none' needs boxes")]),
        (["0 0 0.5 1", ""], {"outside_boxes": "some"}, [(None, "outside_boxes must be one of all, none, got 'some'")]),
    ],
)
def test_box_problems_name_their_row(
    refs: tuple[str, str], boxes: list[str], overrides: dict, expected: list[tuple[int | None, str]]
) -> None:
    request, problems = check([(refs[0], "a dog"), (refs[1], "a red backpack")], boxes, **overrides)
    assert request is None
    assert [(p.subject, needle in p.message) for p, (_, needle) in zip(problems, expected)] == [
        (subject, True) for subject, _ in expected
    ], [p.text() for p in problems]
    assert len(problems) == len(expected)


def test_box_without_subject_is_reported(refs: tuple[str, str]) -> None:
    _, problems = check([(refs[0], "a dog"), (None, "")], ["", "0 0 0.5 1"])
    assert [(p.subject, p.message) for p in problems] == [
        (1, "this box has no subject: add its reference image and phrase, or clear the box")
    ]


def test_cli_command_carries_the_boxes_exactly(refs: tuple[str, str], tmp_path: Path) -> None:
    boxes = ((0.1, 0.2, 0.6000000000000001, 0.9), None)
    request = Request(PROMPT, ((refs[0], "a dog"), (refs[1], "a red backpack")), 128, 256, 2, 3.5, 5,
                      boxes=boxes, outside_boxes="none")
    command = cli_command(ModelSource(preset="tiny"), request, tmp_path / "o.png")
    args = cli.build_parser().parse_args(shlex.split(command.replace("\\\n", " "))[1:])
    assert parse_box_args(args.box, len(args.subject)) == list(boxes)  # bit-exact floats
    assert args.outside_boxes == "none" and [s[1] for s in args.subject] == ["a dog", "a red backpack"]
    plain = cli_command(ModelSource(preset="tiny"), Request(PROMPT, ((refs[0], "a dog"),), 128, 256, 2, 3.5, 5),
                        tmp_path / "o.png")
    assert "--box" not in plain and "--outside-boxes" not in plain


def test_box_preview_draws_each_box_in_its_colour() -> None:
    assert box_preview(["", "nonsense"], ["a dog", "a cat"], 128, 256) is None
    image = box_preview(["0 0 0.5 1", "", "0.5 0.5 1 1"], ["a dog", "", "a cat"], 128, 256)
    assert image.size == (256, 128)
    assert image.getpixel((0, 64)) == PALETTE[0] and image.getpixel((200, 64)) == PALETTE[2]
    assert image.getpixel((200, 20)) == (245, 245, 245)


class FakePipe:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> Any:
        from musar.pipelines.pipeline_musar import MusarPipelineOutput

        self.calls.append(kwargs)
        return MusarPipelineOutput([Image.new("RGB", (kwargs["width"], kwargs["height"]))], None, (8, 16), {})


def test_studio_passes_boxes_and_records_them(refs: tuple[str, str], tmp_path: Path) -> None:
    pipe = FakePipe()
    studio = Studio(pipe, ModelSource(preset="tiny"), tmp_path / "ui")
    request, _ = check([(refs[0], "a dog"), (refs[1], "a red backpack")], ["0 0 0.5 1", ""])
    assert request is not None
    record = studio.generate(request)
    assert pipe.calls[0]["boxes"] == [(0.0, 0.0, 0.5, 1.0), None] and pipe.calls[0]["outside_boxes"] == "all"
    params = json.loads((Path(record.folder) / "params.json").read_text())
    assert params["request"]["boxes"] == [[0.0, 0.0, 0.5, 1.0], None] and params["request"]["outside_boxes"] == "all"
    assert "· boxes (outside: all)" in record.caption()
    assert "--box 0.0 0.0 0.5 1.0" in record.command and "--box none" in record.command


def test_app_has_box_fields_and_preview(tmp_path: Path) -> None:
    from musar.ui.app import MAX_SUBJECTS, build_app

    demo = build_app(Studio(FakePipe(), ModelSource(preset="tiny"), tmp_path))
    ids = {c.get("props", {}).get("elem_id") for c in demo.config["components"]}
    assert {f"subject-box-{k}" for k in range(MAX_SUBJECTS)} | {"musar-outside-boxes", "musar-box-preview"} <= ids


@pytest.mark.slow
def test_cli_command_reproduces_the_ui_image_with_boxes(
    refs: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from musar.pipelines.presets import load_pipeline

    studio = Studio(load_pipeline(preset="tiny"), ModelSource(preset="tiny"), tmp_path / "ui")
    request, problems = check([(refs[0], "a dog"), (refs[1], "a red backpack")], ["0 0 0.5 1", "0.5 0.25 1 0.75"],
                              height=64, width=128, seed=11, condition_size=32, outside_boxes="none")
    assert request is not None, [p.text() for p in problems]
    record = studio.generate(request)
    assert record.route_overlay and Image.open(record.route_overlay).getpixel((0, 32)) == PALETTE[0]
    rc = cli.main(shlex.split(record.command.replace("\\\n", " "))[1:])
    assert rc == 0, capsys.readouterr().err
    ui_image, cli_image = Image.open(record.image), Image.open(Path(record.folder) / "cli.png")
    assert ui_image.size == (128, 64) and ui_image.tobytes() == cli_image.tobytes()
    side = json.loads((Path(record.folder) / "cli.json").read_text())
    assert side["boxes"] == [[0.0, 0.0, 0.5, 1.0], [0.5, 0.25, 1.0, 0.75]] and side["outside_boxes"] == "none"


@pytest.mark.parametrize(("preset", "token_px"), [("tiny", 16), ("toy", 8)])
def test_the_form_judges_boxes_at_the_loaded_models_token_size(
    refs: tuple[str, str], tmp_path: Path, preset: str, token_px: int
) -> None:
    # A 9.6 px wide box on a 64 px image covers one toy token (8 px) but no FLUX one (16 px),
    # as `musar generate --box` judges it for the same model.
    from musar.pipelines.presets import load_pipeline
    from musar.ui.backend import Studio

    studio = Studio(load_pipeline(preset=preset), ModelSource(preset=preset), tmp_path / "ui")
    assert studio.token_px == token_px
    request, problems = check([(refs[0], "a dog")], ["0 0 0.15 1"], height=64, width=64, token_px=studio.token_px)
    if token_px == 8:
        assert problems == [] and request is not None and request.boxes == ((0.0, 0.0, 0.15, 1.0),)
    else:
        assert request is None and ["smaller than one 16x16 px token" in p.message for p in problems] == [True]
