"""The web UI without a browser: form checks -> messages, the CLI command, the gallery's records."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from musar import cli
from musar.errors import MusarError
from musar.ui.backend import Studio
from musar.ui.logic import ModelSource, Problem, Request, check_request, cli_command, problems_html, row_hint

PROMPT = "a photo of a dog and a red backpack on the beach"


@pytest.fixture
def refs(tmp_path: Path) -> tuple[str, str]:
    a, b = tmp_path / "dog.png", tmp_path / "backpack.jpg"
    Image.new("RGB", (48, 40), (200, 40, 40)).save(a)
    Image.new("RGB", (40, 56), (40, 40, 200)).save(b)
    return str(a), str(b)


def check(rows: list[tuple[str | None, str | None]], prompt: str = PROMPT, **overrides: Any) -> tuple[Request | None, list[Problem]]:
    values: dict[str, Any] = {"height": 256, "width": 256, "steps": 4, "guidance": 3.5, "seed": 7} | overrides
    return check_request(prompt, rows, **values)


def texts(problems: list[Problem]) -> str:
    return "\n".join(p.text() for p in problems)


def test_valid_form_gives_request(refs: tuple[str, str]) -> None:
    request, problems = check([(refs[0], " a dog "), (refs[1], "a red backpack"), (None, "")], steps=4.0)
    assert problems == []
    assert request is not None
    assert request.subjects == ((refs[0], "a dog"), (refs[1], "a red backpack"))  # blank row ignored
    assert (request.height, request.width, request.steps, request.seed) == (256, 256, 4, 7)
    assert isinstance(request.steps, int)


@pytest.mark.parametrize(
    ("rows", "needle", "subject"),
    [
        ([("A", "a dog"), ("B", "a cat")], "subject phrase 'a cat' does not appear in the prompt", 1),
        ([("A", "a red backpack"), ("B", "red backpack")], "overlaps another subject phrase", 1),
        ([("A", "a dog"), (None, "a red backpack")], "upload a reference image", 1),
        ([("A", ""), ("B", "a red backpack")], "type the phrase", 0),
        ([("A", "a dog"), ("TXT", "a red backpack")], "not an image file", 1),
        ([("A", "a dog"), ("MISSING", "a red backpack")], "reference image not found", 1),
    ],
)
def test_subject_problems_name_their_row(
    refs: tuple[str, str], tmp_path: Path, rows: list[tuple[str | None, str]], needle: str, subject: int
) -> None:
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    paths = {"A": refs[0], "B": refs[1], "TXT": str(text_file), "MISSING": str(tmp_path / "gone.png"), None: None}
    request, problems = check([(paths[i], p) for i, p in rows])
    assert request is None
    assert [p.subject for p in problems] == [subject], texts(problems)
    assert needle in problems[0].message
    assert texts(problems).startswith(f"Subject {subject + 1}: ")
    assert needle in row_hint(problems, subject) and row_hint(problems, 1 - subject) == ""


def test_every_bad_row_reported_not_just_the_first(refs: tuple[str, str]) -> None:
    _, problems = check([(refs[0], "a cat"), (refs[1], "a horse"), (None, "a dog")])
    assert [p.subject for p in problems] == [0, 1, 2]


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"height": 300}, ["height must be a multiple of 16, got 300"]),
        ({"height": 300, "width": 8000}, ["height must be a multiple of 16", "width must be between 64 and 4096"]),
        ({"width": 32}, ["width must be between 64 and 4096, got 32"]),
        ({"height": None}, ["height is empty"]),
        ({"width": 256.5}, ["width must be a whole number"]),
        ({"steps": 0}, ["steps must be between 1 and 1000, got 0"]),
        ({"steps": -3, "seed": -1}, ["steps must be between 1 and 1000", "seed must be between 0"]),
        ({"guidance": None}, ["guidance is empty"]),
        ({"guidance": "strong"}, ["guidance must be a number, got 'strong'"]),
        ({"condition_size": 100}, ["condition size must be a multiple of 16, got 100"]),
        ({"steps": 5000, "guidance": 101.0, "condition_size": 4096},
         ["steps must be between 1 and 1000", "guidance must be between 0 and 100", "condition size must be between 16 and 2048"]),
        ({"attention": "flash"}, ["unknown attention backend 'flash'"]),
        ({"condition_fit": "stretch"}, ["unknown reference fit 'stretch'"]),
    ],
)
def test_number_and_switch_problems(refs: tuple[str, str], overrides: dict[str, Any], needles: list[str]) -> None:
    request, problems = check([(refs[0], "a dog")], **overrides)
    assert request is None
    assert len(problems) == len(needles), texts(problems)
    for problem, needle in zip(problems, needles):
        assert needle in problem.text()
        assert problem.subject is None


@pytest.mark.parametrize(
    ("field", "flag", "value"),
    [
        ("height", "--height", 300),
        ("width", "--width", 8000),
        ("steps", "--steps", 0),
        ("guidance", "--guidance", 101.0),
        ("guidance", "--guidance", float("nan")),
        ("seed", "--seed", 2**63),
        ("condition_size", "--condition-size", 4096),
    ],
)
def test_number_problems_say_what_the_cli_says(
    refs: tuple[str, str], capsys: pytest.CaptureFixture[str], field: str, flag: str, value: float
) -> None:
    _, problems = check([(refs[0], "a dog")], **{field: value})
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--prompt", PROMPT, "--subject", refs[0], "a dog", flag, str(value)])
    cli_words = capsys.readouterr().err.strip().splitlines()[-1].split(f"argument {flag}: ")[1]
    assert len(problems) == 1 and problems[0].text().endswith(f" {cli_words}"), (texts(problems), cli_words)


def test_empty_prompt_and_no_subjects() -> None:
    _, problems = check([(None, ""), (None, "  ")], prompt="  ")
    assert texts(problems) == "the prompt is empty\nadd at least one subject: a reference image and its phrase"


def test_problems_html_is_escaped_and_empty_when_fine() -> None:
    assert problems_html([]) == ""
    box = problems_html([Problem("phrase '<b>x</b>' missing", 0), Problem("height is empty")])
    assert "&lt;b&gt;x&lt;/b&gt;" in box and "<b>x</b>" not in box
    assert box.count("<li>") == 2 and "Subject 1: phrase" in box and 'role="alert"' in box


def generate_args(command: str) -> Any:
    """The namespace `musar generate` would parse from the command line the UI shows."""
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["musar", "generate"]
    return cli.build_parser().parse_args(argv[1:])


def test_cli_command_round_trips_through_the_generate_parser(refs: tuple[str, str], tmp_path: Path) -> None:
    prompt = "a dog's toy, $HOME `x` and a red backpack; \"quoted\""
    request = Request(prompt, ((refs[0], "a dog's toy"), (refs[1], "a red backpack")), 272, 512, 9, 2.25, 123,
                      condition_size=256, condition_fit="crop", dynamic_routing=False, attention="reference")
    command = cli_command(ModelSource(preset="tiny"), request, tmp_path / "out.png", tmp_path / "maps")
    assert "\n" in command  # one option a line, continued with backslashes
    args = generate_args(command)
    assert args.preset == "tiny" and args.model is None and args.lora is None
    assert args.prompt == prompt
    assert args.subject == [[refs[0], "a dog's toy"], [refs[1], "a red backpack"]]
    assert (args.height, args.width, args.steps, args.guidance, args.seed) == (272, 512, 9, 2.25, 123)
    assert (args.condition_size, args.condition_fit, args.attention) == (256, "crop", "reference")
    assert args.no_dynamic_routing is True
    assert args.out == str(tmp_path / "out.png") and args.routing_maps == str(tmp_path / "maps")
    assert (args.dtype, args.offload) == ("bf16", "none")


def test_model_source_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flux").mkdir()
    assert ModelSource().cli_args() == []
    assert ModelSource(model="black-forest-labs/FLUX.1-dev").cli_args() == ["--model", "black-forest-labs/FLUX.1-dev"]
    local = ModelSource(model="flux", lora="w.safetensors", dtype="fp16", offload="model").cli_args()
    assert local == ["--model", str(tmp_path / "flux"), "--lora", str(tmp_path / "w.safetensors"),
                     "--dtype", "fp16", "--offload", "model"]


class FakePipe:
    """Stands in for MusarPipeline: records the call, returns a flat image, no routing."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> Any:
        from musar.pipelines.pipeline_musar import MusarPipelineOutput

        self.calls.append(kwargs)
        if self.fail is not None:
            raise self.fail
        return MusarPipelineOutput([Image.new("RGB", (kwargs["width"], kwargs["height"]), (9, 9, 9))], None, (4, 4), {"total_s": 0.5})


def test_studio_records_gallery_and_params(refs: tuple[str, str], tmp_path: Path) -> None:
    pipe = FakePipe()
    studio = Studio(pipe, ModelSource(preset="tiny"), tmp_path / "ui")
    first, _ = check([(refs[0], "a dog")], seed=1)
    second, _ = check([(refs[0], "a dog"), (refs[1], "a red backpack")], seed=2)
    assert first is not None and second is not None
    r1, r2 = studio.generate(first), studio.generate(second)
    assert [Path(r.folder).name for r in (r1, r2)] == ["0001", "0002"]
    # References are copied into the result folder, and the pipeline reads those copies.
    assert r2.request.subjects[1] == (str(tmp_path / "ui" / "0002" / "subject_2.jpg"), "a red backpack")
    assert pipe.calls[1]["subjects"] == list(r2.request.subjects)
    assert Path(r2.image).is_file() and (Path(r2.folder) / "params.json").is_file()
    assert r2.routing_grid is None and "--routing-maps" not in r2.command
    assert str(Path(r2.folder) / "subject_1.png") in r2.command
    assert [cap for _, cap in studio.gallery()] == [r2.caption(), r1.caption()]  # newest first
    assert "#2 · 256x256 · 4 steps · guidance 3.5 · seed 2" in r2.caption()
    assert studio.record_at(0) is r2 and studio.record_at(1) is r1 and studio.record_at(2) is None
    assert studio.record(1) is r1 and studio.record(2) is r2 and studio.record(0) is studio.record(3) is None
    params = r1.params()
    assert params["request"]["subjects"] == [{"image": r1.request.subjects[0][0], "phrase": "a dog"}]
    assert params["command"] == r1.command and params["timings"] == {"total_s": 0.5}


def test_toy_preset_form_and_command_use_the_presets_own_defaults(refs: tuple[str, str], tmp_path: Path) -> None:
    from musar.ui.app import FormDefaults

    form = FormDefaults.for_preset("toy")
    assert (form.height, form.width, form.steps, form.condition_size) == (64, 64, 16, 64)
    assert FormDefaults.for_preset("tiny") == FormDefaults(height=256, width=256, steps=4)  # declares none
    pipe = FakePipe()
    studio = Studio(pipe, ModelSource(preset="toy"), tmp_path / "ui")
    request, _ = check([(refs[0], "a dog")])
    assert request is not None
    record = studio.generate(request)
    # the pipeline ran with the toy's token counts and the printed command says them
    assert (pipe.calls[0]["phrase_tokens"], pipe.calls[0]["max_sequence_length"]) == (8, 64)
    assert "--phrase-tokens 8 --max-sequence-length 64" in record.command


def test_failed_generation_leaves_no_folder_and_no_record(refs: tuple[str, str], tmp_path: Path) -> None:
    out = tmp_path / "ui"
    studio = Studio(FakePipe(fail=MusarError("subject phrases 'a' and 'b' share prompt tokens")), ModelSource(), out)
    request, _ = check([(refs[0], "a dog")])
    assert request is not None
    with pytest.raises(MusarError, match="share prompt tokens"):
        studio.generate(request)
    assert list(out.iterdir()) == [] and studio.records == []


def test_app_builds_with_stable_ids(tmp_path: Path) -> None:
    from musar.ui.app import MAX_SUBJECTS, build_app

    demo = build_app(Studio(FakePipe(), ModelSource(preset="tiny"), tmp_path))
    ids = {c.get("props", {}).get("elem_id") for c in demo.config["components"]}
    wanted = {"musar-prompt", "musar-generate", "musar-error", "musar-output", "musar-routing-grid",
              "musar-route-overlay", "musar-command", "musar-gallery", "musar-seed", "musar-preset-warning"}
    wanted |= {f"subject-{kind}-{k}" for kind in ("image", "phrase", "error") for k in range(MAX_SUBJECTS)}
    assert wanted <= ids


def test_ui_parser_defaults_bind_localhost() -> None:
    args = cli.build_parser().parse_args(["ui", "--preset", "tiny"])
    assert (args.host, args.port, args.share, args.preset, args.model) == ("127.0.0.1", 7860, False, "tiny", None)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def test_ui_refuses_busy_port_and_unknown_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, err = run_main(["ui", "--preset", "tiny", "--port", str(port), "--out-dir", str(tmp_path)], capsys)
    assert rc == 2 and f"port {port} on 127.0.0.1 is in use" in err
    # Now free: the preset name is what fails, through load_pipeline (so new presets need no UI change).
    rc, err = run_main(["ui", "--preset", "no-such-preset", "--port", str(port), "--out-dir", str(tmp_path)], capsys)
    assert rc == 2 and "unknown preset 'no-such-preset'" in err


@pytest.mark.slow
def test_cli_command_reproduces_the_ui_image(refs: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from musar.pipelines.presets import load_pipeline

    studio = Studio(load_pipeline(preset="tiny"), ModelSource(preset="tiny"), tmp_path / "ui")
    request, problems = check([(refs[0], "a dog"), (refs[1], "a red backpack")], height=128, width=128, steps=2,
                              seed=11, condition_size=64)
    assert request is not None, texts(problems)
    record = studio.generate(request)
    assert record.routing_grid and Path(record.routing_grid).is_file() and Path(record.route_overlay or "").is_file()
    args = shlex.split(record.command.replace("\\\n", " "))
    rc, err = run_main(args[1:], capsys)
    assert rc == 0, err
    ui_image, cli_image = Image.open(record.image), Image.open(Path(record.folder) / "cli.png")
    assert ui_image.size == (128, 128) and ui_image.tobytes() == cli_image.tobytes()
    assert (Path(record.folder) / "cli_routing" / "routing_grid.png").is_file()
