"""The UI's pure side: form values -> a checked request, problems -> messages, results -> records.

Nothing here imports Gradio, so the rules (and the CLI command the UI hands out) are unit-tested
without a browser. The checks mirror ``musar generate``'s own, reusing its helpers, so the UI
refuses exactly what the CLI would refuse and says it in the same words.
"""

from __future__ import annotations

import html
import math
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from musar.errors import MusarError, describe_failure
from musar.models.boxes import DEFAULT_OUTSIDE, FLUX_TOKEN_PX, OUTSIDE_POLICIES
from musar.models.options import BACKENDS, DEFAULT_BACKEND
from musar.utils.validation import (
    CONDITION_FITS,
    CONDITION_SIZE,
    DEFAULT_CONDITION_FIT,
    GUIDANCE,
    HEIGHT,
    SEED,
    STEPS,
    WIDTH,
    Number,
)

# The choices and defaults of ``musar generate``'s --attention, --condition-fit and --outside-boxes,
# read from the modules that declare them, so the command the UI hands out parses and a backend
# added to RoutingOptions shows up here with no UI change (cli/args.py and cli/generate.py declare
# the three options from these same names).
ATTENTION_BACKENDS, DEFAULT_ATTENTION = BACKENDS, DEFAULT_BACKEND
OUTSIDE_BOXES, DEFAULT_OUTSIDE_BOXES = OUTSIDE_POLICIES, DEFAULT_OUTSIDE  # all: S* routes the tokens outside every box


@dataclass(frozen=True)
class ModelSource:
    """How the app's pipeline was loaded; the CLI command must load the same one."""

    model: str | None = None
    preset: str | None = None
    lora: str | None = None
    dtype: str = "bf16"
    offload: str = "none"
    quantize: str = "none"

    def cli_args(self) -> list[str]:
        args: list[str] = []
        if self.preset is not None:
            args += ["--preset", self.preset]
        elif self.model is not None:
            local = Path(self.model)
            # A local folder must still resolve when the command is run from another directory.
            args += ["--model", str(local.resolve()) if local.exists() else self.model]
        if self.lora is not None:
            args += ["--lora", str(Path(self.lora).resolve())]
        if self.dtype != "bf16":
            args += ["--dtype", self.dtype]
        if self.offload != "none":
            args += ["--offload", self.offload]
        if self.quantize.startswith("gguf:"):  # the file must resolve from any directory, like --model
            args += ["--quantize", "gguf:" + str(Path(self.quantize[5:]).resolve())]
        elif self.quantize != "none":
            args += ["--quantize", self.quantize]
        return args


@dataclass(frozen=True)
class Problem:
    """One thing to fix; ``subject`` is the 0-based row it belongs to, if any."""

    message: str
    subject: int | None = None

    def text(self) -> str:
        return f"Subject {self.subject + 1}: {self.message}" if self.subject is not None else self.message


def failure_problem(exc: BaseException) -> tuple[Problem, bool]:
    """What the page shows for a failed generation, and whether it is a bug.

    The same :func:`~musar.errors.describe_failure` as the CLI decides, so a disk that is full or
    a hostile file reads the same in the page as in the terminal.
    """
    failure = describe_failure(exc)
    if failure is None:
        return Problem(f"internal error (a bug; traceback in the server log): {type(exc).__name__}: {exc}"), True
    return Problem(failure[1]), False


@dataclass(frozen=True)
class Request:
    """A generation the form asked for, already checked."""

    prompt: str
    subjects: tuple[tuple[str, str], ...]  # (reference image path, phrase)
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    condition_size: int = 512
    condition_fit: str = DEFAULT_CONDITION_FIT
    dynamic_routing: bool = True
    attention: str = DEFAULT_ATTENTION
    boxes: tuple[tuple[float, float, float, float] | None, ...] | None = None  # one per subject, or None
    outside_boxes: str = DEFAULT_OUTSIDE_BOXES


def _number(value: Any, rule: Number, problems: list[Problem]) -> Any:
    """A form number checked by the CLI's own rule (same words), or None with a problem.

    Gradio hands over None for a cleared field, which the CLI never sees: that one gets its own
    message. Text is read as a number first, as argparse would read it.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        problems.append(Problem(f"{rule.name} is empty"))
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            problems.append(Problem(f"{rule.name} must be a number, got {value!r}"))
            return None
    try:
        return rule.check(value)
    except MusarError as e:
        problems.append(Problem(str(e)))
        return None


def _check(problems: list[Problem], check: Any, *args: Any, subject: int | None = None) -> bool:
    try:
        check(*args)
    except MusarError as e:
        problems.append(Problem(str(e), subject))
        return False
    return True


def _check_subjects(
    prompt: str, rows: Sequence[tuple[str | None, str | None]], problems: list[Problem]
) -> tuple[list[tuple[str, str]], list[int]]:
    """The complete subjects and the form rows they came from."""
    from musar.utils.images import load_reference
    from musar.utils.spans import find_phrase_chars

    subjects: list[tuple[str, str]] = []
    used: list[int] = []
    matched: list[str] = []
    for k, (image, phrase) in enumerate(rows):
        phrase = (phrase or "").strip()
        if not image and not phrase:
            continue  # an added row left blank is not a mistake worth blocking on
        if not image:
            problems.append(Problem("upload a reference image", k))
        if not phrase:
            problems.append(Problem("type the phrase that names this subject in the prompt", k))
        image_ok = bool(image) and _check(problems, load_reference, image, 16, subject=k)
        phrase_ok = False
        if phrase and prompt:
            # Match against the phrases accepted so far, in order as the pipeline does, so each
            # row whose phrase is missing or overlapping gets its own message.
            phrase_ok = _check(problems, find_phrase_chars, prompt, [*matched, phrase], subject=k)
            if phrase_ok:
                matched.append(phrase)
        if image_ok and phrase_ok:
            subjects.append((str(image), phrase))
            used.append(k)
    if not rows or all(not image and not (phrase or "").strip() for image, phrase in rows):
        problems.append(Problem("add at least one subject: a reference image and its phrase"))
    return subjects, used


def _check_boxes(
    texts: Sequence[str | None], used: list[int], height: int | None, width: int | None,
    dynamic_routing: bool, outside_boxes: str, problems: list[Problem], token_px: int,
) -> tuple[tuple[float, float, float, float] | None, ...] | None:
    """Each row's box field as a checked box (blank = no box), problems named by their row.

    The rules and their words are the pipeline's (:mod:`musar.models.boxes`): each box goes
    through ``check_box`` under its own row, then ``check_boxes`` judges the set (the
    outside-boxes policy, boxes with dynamic routing off).
    """
    from musar.models.boxes import check_box, check_boxes, parse_box_text

    boxes: dict[int, tuple[float, float, float, float] | None] = {}
    for k, text in enumerate(texts):
        try:
            box = parse_box_text(text)
            if box is not None and height is not None and width is not None:
                box = check_box(box, height, width, name="box", token_px=token_px)
            boxes[k] = box
        except MusarError as e:
            problems.append(Problem(str(e), k))
    flagged = {p.subject for p in problems}
    for k, box in boxes.items():
        if box is not None and k not in used and k not in flagged:
            problems.append(Problem("this box has no subject: add its reference image and phrase, or clear the box", k))
    given = any(b is not None for b in boxes.values()) or len(boxes) < len(texts)
    # Each box was judged above, under its row: the set is judged with its boxes left out (so no
    # size is read), and a bad box neither hides a set-level problem nor is reported twice.
    try:
        check_boxes([None] * len(used) if given else None, len(used), 0, 0,
                    dynamic_routing=dynamic_routing, outside=outside_boxes)
    except MusarError as e:
        problems.append(Problem(str(e)))
        return None
    return tuple(boxes.get(k) for k in used) if given else None


def box_preview(
    texts: Sequence[str | None], labels: Sequence[str | None], height: Any, width: Any, size: int = 256
) -> Any:
    """A PIL picture of the boxes typed so far on an image of the chosen aspect (None if no box).

    Boxes that do not parse yet are left out: the form reports them when Generate is pressed.
    """
    from PIL import Image, ImageDraw

    from musar.models.boxes import parse_box_text
    from musar.pipelines.routing_maps import draw_boxes, subject_colour

    boxes = []
    for text in texts:
        try:
            boxes.append(parse_box_text(text))
        except MusarError:
            boxes.append(None)
    boxes = [b if b is not None and all(0 <= v <= 1 for v in b) and b[2] > b[0] and b[3] > b[1] else None for b in boxes]
    if not any(boxes):
        return None
    try:
        aspect = float(height) / float(width)
    except (TypeError, ValueError, ZeroDivisionError):
        aspect = 1.0
    aspect = aspect if math.isfinite(aspect) and 0.1 < aspect < 10 else 1.0
    canvas = Image.new("RGB", (size, max(16, round(size * aspect))), (245, 245, 245))
    draw_boxes(canvas, boxes, width=3)
    draw = ImageDraw.Draw(canvas)
    for k, box in enumerate(boxes):
        if box is not None:
            label = f"{k + 1}: {(labels[k] if k < len(labels) else None) or ''}"[:28]
            draw.text((box[0] * canvas.width + 6, box[1] * canvas.height + 5), label, fill=subject_colour(k))
    return canvas


def check_request(
    prompt: str | None,
    rows: Sequence[tuple[str | None, str | None]],
    height: Any,
    width: Any,
    steps: Any,
    guidance: Any,
    seed: Any,
    condition_size: Any = 512,
    condition_fit: str = DEFAULT_CONDITION_FIT,
    dynamic_routing: bool = True,
    attention: str = DEFAULT_ATTENTION,
    boxes: Sequence[str | None] | None = None,
    outside_boxes: str = DEFAULT_OUTSIDE_BOXES,
    token_px: int = FLUX_TOKEN_PX,
) -> tuple[Request | None, list[Problem]]:
    """The form's values as a :class:`Request`, or None with every problem found (not just the first).

    ``boxes``: each row's box field as typed ("x0 y0 x1 y1" fractions; blank = no box), each at
    least one ``token_px`` token (:attr:`Studio.token_px`: the loaded model's).
    """
    problems: list[Problem] = []
    prompt = (prompt or "").strip()
    if not prompt:
        problems.append(Problem("the prompt is empty"))
    subjects, used = _check_subjects(prompt, rows, problems)
    h, w = _number(height, HEIGHT, problems), _number(width, WIDTH, problems)
    n_steps, g = _number(steps, STEPS, problems), _number(guidance, GUIDANCE, problems)
    s, cs = _number(seed, SEED, problems), _number(condition_size, CONDITION_SIZE, problems)
    checked_boxes = _check_boxes(
        list(boxes or [None] * len(rows)), used, h, w, bool(dynamic_routing), outside_boxes, problems, token_px
    )
    if condition_fit not in CONDITION_FITS:
        problems.append(Problem(f"unknown reference fit {condition_fit!r}; expected one of {list(CONDITION_FITS)}"))
    if attention not in ATTENTION_BACKENDS:
        problems.append(Problem(f"unknown attention backend {attention!r}; expected one of {list(ATTENTION_BACKENDS)}"))
    if problems:
        return None, problems
    assert h is not None and w is not None and n_steps is not None and g is not None and s is not None and cs is not None
    request = Request(
        prompt, tuple(subjects), h, w, n_steps, g, s, cs, condition_fit, bool(dynamic_routing), attention,
        checked_boxes, outside_boxes,
    )
    return request, []


def problems_html(problems: Sequence[Problem], title: str = "Cannot generate") -> str:
    """An alert box listing every problem; empty string (nothing shown) when there are none."""
    if not problems:
        return ""
    items = "".join(f"<li>{html.escape(p.text(), quote=False)}</li>" for p in problems)
    return (
        '<div class="musar-error" role="alert" style="border:1px solid #d33;background:#fff0f0;'
        f'color:#8a0000;padding:8px 12px;border-radius:6px"><b>{html.escape(title, quote=False)}:</b><ul>{items}</ul></div>'
    )


def row_hint(problems: Sequence[Problem], subject: int) -> str:
    """The problems of one subject row, shown under that row."""
    mine = [p for p in problems if p.subject == subject]
    if not mine:
        return ""
    return "".join(f'<div style="color:#b00000;font-size:0.9em">{html.escape(p.message, quote=False)}</div>' for p in mine)


def cli_command(
    source: ModelSource, request: Request, out: str | Path, routing_maps: str | Path | None = None,
    threads: int | None = None, tokens: dict[str, int] | None = None,
) -> str:
    """A ``musar generate`` command line that reproduces ``request``'s image, one option a line.

    ``threads``: the CPU threads the image was made with; CPU reductions round differently with
    another thread count, so the command pins it to reproduce the image bit for bit."""
    lines: list[list[str]] = [["musar", "generate"], source.cli_args(), ["--prompt", request.prompt]]
    boxes = request.boxes or (None,) * len(request.subjects)
    for (image, phrase), box in zip(request.subjects, boxes):
        # repr() of a float reads back as the same float: the command reproduces the boxes exactly
        box_args = [] if request.boxes is None else ["--box", *(["none"] if box is None else [repr(v) for v in box])]
        lines.append(["--subject", str(Path(image).resolve()), phrase, *box_args])
    if request.boxes is not None and request.outside_boxes != DEFAULT_OUTSIDE_BOXES:
        lines.append(["--outside-boxes", request.outside_boxes])
    lines += [
        ["--height", str(request.height), "--width", str(request.width)],
        ["--steps", str(request.steps), "--guidance", repr(request.guidance), "--seed", str(request.seed)],
        ["--condition-size", str(request.condition_size), "--condition-fit", request.condition_fit],
        ["--attention", request.attention, *([] if request.dynamic_routing else ["--no-dynamic-routing"])],
        ["--out", str(Path(out).resolve())],
        ["--threads", str(threads)] if threads is not None else [],
        # the token counts the image was made with (a preset's own differ from FLUX's)
        [] if tokens is None else
        ["--phrase-tokens", str(tokens["phrase_tokens"]), "--max-sequence-length", str(tokens["max_sequence_length"])],
    ]
    if routing_maps is not None:
        lines.append(["--routing-maps", str(Path(routing_maps).resolve())])
    return " \\\n  ".join(shlex.join(line) for line in lines if line)


@dataclass
class Record:
    """One result of this app run, as the gallery lists it."""

    index: int
    folder: str
    image: str
    request: Request
    command: str
    routing_grid: str | None = None
    route_overlay: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def caption(self) -> str:
        r = self.request
        phrases = ", ".join(p for _, p in r.subjects)
        routing = "dynamic" if r.dynamic_routing else "static"
        boxes = "" if r.boxes is None else f" · boxes (outside: {r.outside_boxes})"
        return (
            f"#{self.index} · {r.width}x{r.height} · {r.steps} steps · guidance {r.guidance:g} · seed {r.seed} · "
            f"{routing} routing, {r.attention}{boxes} · {phrases}"
        )

    def params(self) -> dict[str, Any]:
        """Everything that made this image, for the gallery's detail view and params.json."""
        out = asdict(self)
        out["request"]["subjects"] = [{"image": i, "phrase": p} for i, p in self.request.subjects]
        boxes = self.request.boxes
        out["request"]["boxes"] = None if boxes is None else [None if b is None else list(b) for b in boxes]
        out["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return out
