"""Boxes through the whole stack: the transformer's routes in every layer and step, the pipeline,
``musar generate`` (sidecar, routing maps, every bad input through a real subprocess)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from musar.cli import main
from musar.errors import MusarError
from musar.models.attention import RouteRecord
from musar.models.boxes import box_candidates, token_box_membership, token_labels_from_boxes
from musar.models.options import RoutingOptions
from musar.models.routing import routing_accuracy
from musar.models.transformer import MusarTransformer
from musar.pipelines.pipeline_musar import MusarPipeline
from musar.pipelines.presets import tiny_pipeline
from musar.pipelines.routing_maps import PALETTE, route_overlay

from helpers import make_inputs

BOXES = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.25, 0.25, 0.75, 0.75)]
GRID = (4, 4)


def _check_routes(records: list[RouteRecord], boxes: list, outside: str, grid: tuple[int, int] = GRID) -> None:
    """Every captured route obeys the boxes: one box -> that subject, several -> one of them,
    none -> any subject ("all") or no condition ("none")."""
    cand = box_candidates(boxes, grid, outside)
    c = len(boxes)
    assert records
    for rec in records:
        r = rec.routes.reshape(rec.routes.shape[0], -1, rec.routes.shape[-1])  # (B, heads, n)
        for i in range(cand.shape[0]):
            if cand[i].any():
                assert cand[i][r[..., i].flatten()].all(), (rec.layer, rec.step, i)
            else:
                assert (r[..., i] == c).all()


@pytest.fixture
def model(tiny_flux_config: dict) -> MusarTransformer:
    torch.manual_seed(0)
    return MusarTransformer(**tiny_flux_config).eval()


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize(("c", "outside", "per_head"), [(1, "all", False), (2, "none", True), (4, "all", False)])
def test_transformer_routes_obey_boxes_in_every_routed_layer(
    model: MusarTransformer, c: int, outside: str, per_head: bool, cached: bool
) -> None:
    spans = [[(k, 1) for k in range(c)]] * 2
    inputs = make_inputs(model, batch=2, num_conditions=c, spans=spans)
    cond = inputs.pop("conditions")
    cond.candidates = box_candidates(BOXES[:c], GRID, outside)[None].expand(2, -1, -1)
    opts = RoutingOptions(per_head=per_head, independent_conditions=cached, start_layer=1)
    records: list[RouteRecord] = []
    with torch.no_grad():
        if cached:
            cache = model.build_condition_cache(cond, inputs["pooled_projections"], inputs["guidance"], routing=opts)
            model(**inputs, condition_cache=cache, routing=opts, capture=records.append, step_index=3)
        else:
            model(**inputs, conditions=cond, routing=opts, capture=records.append, step_index=3)
    # start_layer still gates where routes act: layer 0 is not routed, boxes or not.
    assert [r.layer for r in records] == [1, 2, 3]
    _check_routes(records, BOXES[:c], outside)


def test_single_subject_box_changes_the_forward_and_start_step_gates_it(model: MusarTransformer) -> None:
    inputs = make_inputs(model, num_conditions=1)
    with torch.no_grad():
        plain = model(**inputs).sample
        inputs["conditions"].candidates = box_candidates([BOXES[0]], GRID)[None]
        boxed = model(**inputs).sample
        early = model(**inputs, routing=RoutingOptions(start_step=2), step_index=1).sample
        off = model(**inputs, routing=RoutingOptions(dynamic=False)).sample
    assert not torch.allclose(plain, boxed, atol=1e-5)  # c = 1: a box acts although S* has no choice
    assert torch.equal(early, plain) and torch.equal(off, plain)  # before start_step / routing off: no effect


@pytest.fixture(scope="module")
def pipe() -> MusarPipeline:
    return tiny_pipeline()


PROMPT = "a corgi, a red backpack and a teapot on the beach"
PHRASES = ["a corgi", "a red backpack", "a teapot"]


def _refs(c: int) -> list[tuple[Image.Image, str]]:
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    return [(Image.new("RGB", (40, 40), colours[k]), PHRASES[k]) for k in range(c)]


def _pipe_records(pipe: MusarPipeline, monkeypatch: pytest.MonkeyPatch) -> list[RouteRecord]:
    """Every RouteRecord the pipeline's transformer produces (the recorder only keeps sums)."""
    records: list[RouteRecord] = []
    forward = pipe.transformer.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        outer = kwargs.get("capture")

        def both(rec: RouteRecord) -> None:
            records.append(rec)
            if outer is not None:
                outer(rec)

        return forward(*args, **dict(kwargs, capture=both))

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    return records


@pytest.mark.parametrize(("c", "boxes", "outside"), [
    (2, [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)], "all"),
    (3, [(0.0, 0.0, 0.5, 0.5), None, (0.25, 0.25, 1.0, 1.0)], "none"),
    (1, [(0.0, 0.0, 0.5, 1.0)], "all"),
])
def test_pipeline_boxes_route_every_step(
    pipe: MusarPipeline, monkeypatch: pytest.MonkeyPatch, c: int, boxes: list, outside: str
) -> None:
    records = _pipe_records(pipe, monkeypatch)
    out = pipe(PROMPT, _refs(c), boxes=boxes, outside_boxes=outside, height=64, width=128, num_inference_steps=2,
               condition_size=32, generator=torch.Generator().manual_seed(0), return_routing=True, progress=False)
    grid = (4, 8)
    assert out.grid == grid and out.boxes == boxes
    assert sorted({r.step for r in records}) == [0, 1] and len(records) == 2 * 3  # every layer, every step
    _check_routes(records, boxes, outside, grid)
    # The recorder's per-step shares are the routes the layers took: tokens in one box go to it.
    share = out.routing.route_share()
    inside = token_box_membership(boxes, grid)
    for k in range(c):
        only_k = int(((inside.sum(1) == 1) & inside[:, k]).sum())
        assert all(s >= only_k / 32 - 1e-6 for s in share["subjects"][k])
    if outside == "none" or c == 1:
        free = int((~inside.any(1)).sum()) / 32
        assert share["no_condition"] == [pytest.approx(free)] * 2
    else:
        assert share["no_condition"] == [0.0, 0.0]
    labels = token_labels_from_boxes(boxes, grid)
    assert routing_accuracy(out.routing.routes(1)[0], labels).overall == 1.0


def test_pipeline_bad_boxes_are_user_errors(pipe: MusarPipeline) -> None:
    def call(**kw: Any) -> None:
        pipe(PROMPT, _refs(2), height=64, width=64, num_inference_steps=1, condition_size=32, progress=False, **kw)

    with pytest.raises(MusarError, match="got 1 boxes for 2 subjects"):
        call(boxes=[(0, 0, 1, 1)])
    with pytest.raises(MusarError, match="smaller than one 16x16 px token"):
        call(boxes=[(0, 0, 0.2, 1), None])
    with pytest.raises(MusarError, match="switched off"):
        call(boxes=[(0, 0, 0.5, 1), None], dynamic_routing=False)
    with pytest.raises(MusarError, match="switched off"):
        call(boxes=[(0, 0, 0.5, 1), None], routing=RoutingOptions(dynamic=False))
    with pytest.raises(MusarError, match="needs boxes"):
        call(outside_boxes="none")


# ---- musar generate ------------------------------------------------------------------------

FAST = ["--preset", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--condition-size", "32"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("refs")
    paths = []
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 200, 30)), ("c", (30, 30, 200))):
        paths.append(d / f"{name}.png")
        Image.new("RGB", (40, 30), colour).save(paths[-1])
    return paths


def _subjects(images: list[Path], c: int) -> list[str]:
    return [arg for k in range(c) for arg in ("--subject", str(images[k]), PHRASES[k])]


def test_generate_records_boxes_and_reproduces_from_the_sidecar(images: list[Path], tmp_path: Path) -> None:
    out, maps = tmp_path / "a.png", tmp_path / "maps"
    box_args = ["--box", "0", "0", "0.5", "1", "--box", "none", "--box", "0.5", "0.25", "1", "0.75"]
    argv = ["generate", "--prompt", PROMPT, *_subjects(images, 3), *box_args, "--outside-boxes", "none",
            *FAST, "--seed", "3", "--out", str(out), "--routing-maps", str(maps)]
    assert main(argv) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["boxes"] == [[0.0, 0.0, 0.5, 1.0], None, [0.5, 0.25, 1.0, 0.75]] and side["outside_boxes"] == "none"
    share = side["route_share"]
    assert share["steps"] == [0, 1] and len(share["subjects"]) == 3
    for step in range(2):  # a share per subject per step, plus the tokens that read nothing
        assert sum(s[step] for s in share["subjects"]) + share["no_condition"][step] == pytest.approx(1.0)
    assert share["subjects"][0] == [0.5, 0.5] and share["subjects"][1] == [0.0, 0.0]
    routing = json.loads((maps / "routing.json").read_text())
    assert routing["boxes"] == side["boxes"] and routing["route_share"] == share and routing["outside_boxes"] == "none"
    # The overlay draws each box in its subject's colour (box 1's left edge, box 3's top edge).
    overlay = Image.open(maps / "route_overlay.png").convert("RGB")
    assert overlay.getpixel((0, 32)) == PALETTE[0] and overlay.getpixel((48, 16)) == PALETTE[2]
    assert Image.open(maps / "routing_grid.png").size[1] > 0

    # The sidecar holds what it takes to make the same image again, boxes included.
    again = tmp_path / "b.png"
    replay = ["generate", "--prompt", side["prompt"], "--preset", side["preset"], "--seed", str(side["seed"]),
              "--steps", str(side["steps"]), "--height", str(side["height"]), "--width", str(side["width"]),
              "--condition-size", str(side["condition_size"]), "--outside-boxes", side["outside_boxes"],
              "--out", str(again)]
    for subject, box in zip(side["subjects"], side["boxes"]):
        replay += ["--subject", subject["image"], subject["phrase"], "--box", *(["none"] if box is None else map(repr, box))]
    assert main(replay) == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()


def test_single_subject_box_writes_routing_maps(images: list[Path], tmp_path: Path) -> None:
    out, maps = tmp_path / "one.png", tmp_path / "maps"
    argv = ["generate", "--prompt", PROMPT, *_subjects(images, 1), "--box", "0.25", "0", "0.75", "1", *FAST,
            "--out", str(out), "--routing-maps", str(maps)]
    assert main(argv) == 0
    routing = json.loads((maps / "routing.json").read_text())
    assert routing["route_share"]["subjects"] == [[0.5, 0.5]] and routing["route_share"]["no_condition"] == [0.5, 0.5]
    assert (maps / "routing_grid.png").is_file()


def test_overlay_marks_tokens_that_read_nothing() -> None:
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    routes = torch.tensor([0, 1, 2, 2, 0, 1, 2, 2])  # c = 2: route 2 = no condition
    overlay = route_overlay(image, routes, (2, 4), alpha=1.0, num_conditions=2)
    assert overlay.getpixel((40, 8)) != PALETTE[2] and overlay.getpixel((8, 8)) == PALETTE[0]


def test_recorder_counts_the_routes_every_layer_and_head_took() -> None:
    from musar.pipelines.routing_maps import RoutingRecorder

    rec = RoutingRecorder()
    aff = torch.zeros(1, 2, 4, 2)  # (B, H, n, c): per-head records
    rec(RouteRecord(0, 0, aff, torch.tensor([[[0, 0, 1, 2], [0, 1, 1, 2]]])))
    rec(RouteRecord(1, 0, aff, torch.tensor([[[0, 0, 0, 2], [0, 0, 1, 2]]])))
    assert rec.route_share() == {"steps": [0], "subjects": [[0.5], [0.25]], "no_condition": [0.25]}
    assert rec.routes(0).tolist() == [[0, 0, 1, 2]]  # most frequent over layers and heads, ties to the lower
    assert rec.affinity(0).shape == (1, 4, 2)
