"""The Gradio Blocks app behind ``musar ui``: the form, the results, the gallery.

Layout and wiring only; the rules live in :mod:`musar.ui.logic` and generation in
:mod:`musar.ui.backend`. Every element a test or a user script may look for has a stable
``elem_id`` (``musar-*``, ``subject-*-K``).
"""

from __future__ import annotations

import inspect
import re
import secrets
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from musar.ui.backend import NO_MAPS_NOTE, Studio
from musar.ui.logic import (
    ATTENTION_BACKENDS,
    CONDITION_FITS,
    DEFAULT_ATTENTION,
    DEFAULT_CONDITION_FIT,
    DEFAULT_OUTSIDE_BOXES,
    OUTSIDE_BOXES,
    Record,
    box_preview,
    check_request,
    failure_problem,
    problems_html,
    row_hint,
)
from musar.utils.registry import get_preset

MAX_SUBJECTS = 6  # rows built up front and shown/hidden: stabler in tests than dynamic rendering
INITIAL_SUBJECTS = 2
RANDOM_SEED_BOUND = 2**31  # short enough to read back and type


@dataclass(frozen=True)
class FormDefaults:
    """Starting values of the form; presets get small ones so a click answers in seconds."""

    height: int = 1024
    width: int = 1024
    steps: int = 28
    guidance: float = 3.5
    condition_size: int = 512

    @classmethod
    def for_preset(cls, preset: str | None) -> FormDefaults:
        """The preset's own generation defaults where it declares them (toy: 64 px, 16 steps), else
        small ones for a random preset, else FLUX.1's."""
        from musar.pipelines.presets import FLUX_GENERATION, generation_defaults

        if preset is None:
            return cls()
        own = generation_defaults(preset)
        if own == FLUX_GENERATION:  # declares none (tiny): FLUX's sizes would take minutes on a CPU
            return cls(height=256, width=256, steps=4)
        return cls(height=own.height, width=own.width, steps=own.steps, guidance=own.guidance,  # type: ignore[arg-type]
                   condition_size=own.condition_size)  # type: ignore[arg-type]


def _supported(component: type, **options: Any) -> dict[str, Any]:
    """The ``options`` this Gradio version's ``component`` accepts (the range spans Gradio 5 and 6)."""
    params = inspect.signature(component.__init__).parameters
    return {k: v for k, v in options.items() if k in params}


def _copy_button() -> dict[str, Any]:
    # Gradio 6 took `buttons=["copy"]` where Gradio 5 took `show_copy_button=True`.
    return _supported(gr.Textbox, buttons=["copy"]) or {"show_copy_button": True}


def _result_info(record: Record) -> str:
    t = record.timings
    text = (
        f"**Result #{record.index}** in {t.get('total_s', 0.0):.1f} s (encode {t.get('encode_s', 0.0):.1f} s, "
        f"denoise {t.get('denoise_s', 0.0):.1f} s) · seed {record.request.seed} · saved in `{record.folder}`"
    )
    return text if record.routing_grid else f"{text}\n\n{NO_MAPS_NOTE}"


def build_app(studio: Studio, defaults: FormDefaults | None = None) -> gr.Blocks:
    """The Blocks app for ``studio``'s pipeline (not launched; see :func:`launch`)."""
    defaults = defaults or FormDefaults.for_preset(studio.source.preset)
    with gr.Blocks(title="MUSAR", analytics_enabled=False) as demo:
        gr.Markdown("# MUSAR · multi-subject customization of FLUX.1 via attention routing")
        if studio.source.preset is not None and get_preset(studio.source.preset).random_weights:
            gr.Markdown(
                f"**Preset `{studio.source.preset}` has RANDOM weights: images are noise.** "
                "It exists to try the app without downloading FLUX.1; start with `--model` for real images.",
                elem_id="musar-preset-warning",
            )
        with gr.Row():
            with gr.Column(scale=5):
                prompt = gr.Textbox(
                    label="Prompt (must contain every subject phrase)", lines=2, elem_id="musar-prompt",
                    placeholder="a photo of a corgi and a red backpack on a beach",
                )
                count = gr.State(INITIAL_SUBJECTS)
                rows: list[gr.Row] = []
                images: list[gr.Image] = []
                phrases: list[gr.Textbox] = []
                boxes: list[gr.Textbox] = []
                hints: list[gr.HTML] = []
                for k in range(MAX_SUBJECTS):
                    with gr.Row(visible=k < INITIAL_SUBJECTS, elem_id=f"subject-row-{k}") as row:
                        # image_mode=None: keep the uploaded file as is, so the CLI command reads the same bytes.
                        images.append(gr.Image(
                            label=f"Subject {k + 1}: reference image", type="filepath", image_mode=None,
                            sources=["upload", "clipboard"], height=160, scale=1, elem_id=f"subject-image-{k}",
                        ))
                        with gr.Column(scale=2):
                            phrases.append(gr.Textbox(
                                label=f"Subject {k + 1}: phrase in the prompt", placeholder="a corgi",
                                elem_id=f"subject-phrase-{k}",
                            ))
                            boxes.append(gr.Textbox(
                                label=f"Subject {k + 1}: layout box x0 y0 x1 y1 (fractions of the image; optional)",
                                placeholder="0 0 0.5 1  (left half)", elem_id=f"subject-box-{k}",
                            ))
                            hints.append(gr.HTML("", elem_id=f"subject-error-{k}"))
                    rows.append(row)
                with gr.Row():
                    add = gr.Button("Add subject", size="sm", elem_id="musar-add-subject")
                    remove = gr.Button("Remove last subject", size="sm", elem_id="musar-remove-subject")
                with gr.Row():
                    # Plain numbers, not sliders: a bad value gets an explanation instead of being clamped.
                    height = gr.Number(defaults.height, label="Height (multiple of 16)", elem_id="musar-height")
                    width = gr.Number(defaults.width, label="Width (multiple of 16)", elem_id="musar-width")
                    steps = gr.Number(defaults.steps, label="Steps", elem_id="musar-steps")
                with gr.Row():
                    guidance = gr.Number(defaults.guidance, label="Guidance", elem_id="musar-guidance")
                    seed = gr.Number(0, label="Seed", elem_id="musar-seed")
                    randomise = gr.Checkbox(False, label="Randomise seed on each run", elem_id="musar-randomise")
                with gr.Accordion("Routing and references", open=True):
                    with gr.Row():
                        dynamic = gr.Checkbox(True, label="Dynamic routing", elem_id="musar-dynamic-routing")
                        attention = gr.Radio(
                            list(ATTENTION_BACKENDS), value=DEFAULT_ATTENTION, label="Attention backend", elem_id="musar-attention"
                        )
                    with gr.Row():
                        outside_boxes = gr.Radio(
                            list(OUTSIDE_BOXES), value=DEFAULT_OUTSIDE_BOXES, elem_id="musar-outside-boxes",
                            label="Tokens outside every box read: all subjects (routing decides) or none",
                        )
                        preview = gr.Image(
                            label="Layout boxes (preview)", type="pil", format="png", interactive=False, height=160,
                            elem_id="musar-box-preview",
                        )
                    with gr.Row():
                        condition_size = gr.Number(
                            defaults.condition_size, label="Reference size (multiple of 16)", elem_id="musar-condition-size"
                        )
                        condition_fit = gr.Radio(
                            list(CONDITION_FITS), value=DEFAULT_CONDITION_FIT, label="Reference fit", elem_id="musar-condition-fit"
                        )
                generate = gr.Button("Generate", variant="primary", elem_id="musar-generate")
                error = gr.HTML("", elem_id="musar-error")
            with gr.Column(scale=6):
                output = gr.Image(
                    label="Result", type="filepath", format="png", interactive=False, height=420, elem_id="musar-output"
                )
                info = gr.Markdown(elem_id="musar-info")
                gr.Markdown(
                    "Routing maps: a row per subject with its affinity S* to each image token (brighter = more), "
                    "then the route each token took; a column per denoising step.",
                )
                with gr.Row():
                    grid = gr.Image(
                        label="Routing maps (Fig. 5)",
                        type="filepath", format="png", interactive=False, elem_id="musar-routing-grid",
                    )
                    overlay = gr.Image(
                        label="Route overlay (last step)", type="filepath", format="png", interactive=False,
                        elem_id="musar-route-overlay",
                    )
                command = gr.Textbox(
                    label="CLI command reproducing this image", lines=4, interactive=False, elem_id="musar-command",
                    **_copy_button(),
                )
        gallery = gr.Gallery(
            label="Results since the app started (newest first; click one for its parameters)",
            columns=6, height=260, object_fit="contain", elem_id="musar-gallery",
            **_supported(gr.Gallery, fit_columns=False),  # one result must not fill the whole width
        )
        selected = gr.JSON(label="Parameters of the selected result", elem_id="musar-selected")

        form = {prompt, count, *images, *phrases, *boxes, height, width, steps, guidance, seed, randomise,
                dynamic, attention, condition_size, condition_fit, outside_boxes}

        def on_generate(values: dict[Any, Any], progress: gr.Progress = gr.Progress(track_tqdm=True)) -> dict[Any, Any]:  # noqa: B008 (Gradio's idiom)
            n = int(values[count])
            rows_in = [(values[images[k]], values[phrases[k]]) for k in range(n)]
            seed_value = secrets.randbelow(RANDOM_SEED_BOUND) if values[randomise] else values[seed]
            request, problems = check_request(
                values[prompt], rows_in, values[height], values[width], values[steps], values[guidance],
                seed_value, values[condition_size], values[condition_fit], values[dynamic], values[attention],
                [values[boxes[k]] for k in range(n)], values[outside_boxes], token_px=studio.token_px,
            )
            record = None
            if request is not None:
                try:
                    record = studio.generate(request, status=lambda msg: progress(0.0, desc=msg))
                except Exception as e:  # the CLI's boundary; a bug is logged and the page keeps serving
                    problem, bug = failure_problem(e)
                    if bug:
                        traceback.print_exc(file=sys.stderr)
                    problems = [problem]
            updates: dict[Any, Any] = {error: problems_html(problems), seed: seed_value}
            updates |= {hints[k]: row_hint(problems, k) for k in range(MAX_SUBJECTS)}
            if record is not None:
                updates |= {
                    output: record.image, grid: record.routing_grid, overlay: record.route_overlay,
                    info: _result_info(record), command: record.command, gallery: studio.gallery(),
                }
            return updates

        def on_count(n: int, delta: int) -> list[Any]:
            n = max(1, min(MAX_SUBJECTS, int(n) + delta))
            # A hidden row is cleared so a later "add" starts empty and nothing hidden is generated.
            shown = [gr.update(visible=k < n) for k in range(MAX_SUBJECTS)]
            cleared = [gr.update() if k < n else None for k in range(MAX_SUBJECTS)]
            blank = [gr.update() if k < n else "" for k in range(MAX_SUBJECTS)]
            return [n, *shown, *cleared, *blank, *blank, *blank]

        def on_boxes(n: int, h: Any, w: Any, *texts: str) -> Any:
            shown = int(n)
            return box_preview(texts[:shown], texts[MAX_SUBJECTS:MAX_SUBJECTS + shown], h, w)

        def on_select(evt: gr.SelectData) -> dict[str, Any] | None:
            # The caption names the result ("#N ..."): right even when this page's gallery is older
            # than the server's list (another tab generated since); the position is the fallback.
            value = evt.value if isinstance(evt.value, dict) else {}
            number = re.match(r"#(\d+) ", str(value.get("caption") or ""))
            record = studio.record(int(number.group(1))) if number else studio.record_at(int(evt.index))
            return None if record is None else record.params()

        generate.click(on_generate, inputs=form, outputs=[error, seed, *hints, output, grid, overlay, info, command, gallery])
        count_outputs = [count, *rows, *images, *phrases, *hints, *boxes]
        add.click(lambda n: on_count(n, +1), inputs=count, outputs=count_outputs, queue=False)
        remove.click(lambda n: on_count(n, -1), inputs=count, outputs=count_outputs, queue=False)
        gallery.select(on_select, inputs=None, outputs=selected, queue=False)
        preview_inputs = [count, height, width, *boxes, *phrases]
        for trigger in (*boxes, *phrases, height, width, count):
            trigger.change(on_boxes, inputs=preview_inputs, outputs=preview, queue=False)
        demo.load(studio.gallery, inputs=None, outputs=gallery, queue=False)
    return demo


def launch(
    studio: Studio,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    defaults: FormDefaults | None = None,
    block: bool = True,
) -> gr.Blocks:
    """Serve the app; one generation at a time through Gradio's queue."""
    demo = build_app(studio, defaults)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host, server_port=port, share=share, inbrowser=False, show_error=True,
        allowed_paths=[str(Path(studio.out_dir).resolve())], prevent_thread_lock=not block,
    )
    return demo

