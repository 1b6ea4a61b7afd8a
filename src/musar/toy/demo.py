"""``musar toy demo``: a real two-subject composition from the shipped toy weights, on CPU.

Loads ``load_pipeline(preset="toy")`` (trained base + full MUSAR LoRA, package data), composes the
two reference images under ``examples/toy/`` (rendered from held-out identities if missing), writes
the image, the references, routing maps and the analyser's verdict, and prints the verdict.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from musar.toy.analyser import evaluate
from musar.toy.cases import Case, generate_case, make_cases
from musar.utils.io import atomic_write_json

EXAMPLES = Path("examples/toy")
DEMO_CASE = 4  # a same-shape held-out pair: the case routing exists for


def demo_case() -> Case:
    return make_cases(DEMO_CASE + 1)[DEMO_CASE]


def write_examples(folder: str | Path = EXAMPLES) -> Path:
    """The demo's two reference PNGs plus demo.json (prompt, phrases) under ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    case = demo_case()
    for name, img in zip(("ref_a.png", "ref_b.png"), case.reference_images(), strict=True):
        img.save(folder / name)
    atomic_write_json(folder / "demo.json", {"prompt": case.prompt, "phrases": list(case.phrases),
                                             "references": ["ref_a.png", "ref_b.png"], "case": DEMO_CASE})
    return folder


def run_demo(out: str | Path, seed: int = 0, examples: str | Path = EXAMPLES) -> str:
    """Generate the demo composition; returns the verdict text (also written to verdict.txt)."""
    from PIL import Image

    from musar.pipelines.presets import load_pipeline
    from musar.pipelines.routing_maps import route_overlay, save_routing_grid

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    case = demo_case()
    refs = case.reference_images()
    ex = Path(examples)
    if (ex / "ref_a.png").is_file() and (ex / "ref_b.png").is_file():
        refs = [Image.open(ex / "ref_a.png").convert("RGB"), Image.open(ex / "ref_b.png").convert("RGB")]
    pipe = load_pipeline(preset="toy", device="cpu")
    images, result = generate_case(pipe, case, (seed,), return_routing=True, references=refs)
    image = images[0]
    image.save(out / "composition.png")
    image.resize((256, 256), Image.NEAREST).save(out / "composition_x4.png")
    for name, ref in zip(("ref_a.png", "ref_b.png"), refs, strict=True):
        ref.save(out / name)
    rec = result.routing  # type: ignore[attr-defined]
    if rec is not None and rec.steps:
        save_routing_grid(rec, result.grid, list(case.phrases), out / "routing_grid.png")  # type: ignore[attr-defined]
        route_overlay(image.resize((256, 256), Image.NEAREST), rec.routes(rec.steps[-1])[0],
                      result.grid).save(out / "route_overlay.png")  # type: ignore[attr-defined]
    verdict = evaluate(image, case.identities, case.scene)
    text = (f"prompt: {case.prompt}\nsubjects: {case.phrases[0]!r}, {case.phrases[1]!r}\n"
            f"analyser verdict:\n{verdict.describe()}\n"
            f"both present: {verdict.all_present}; leaked attributes: {verdict.leaks}\n")
    (out / "verdict.txt").write_text(text)
    (out / "demo.json").write_text(json.dumps({"prompt": case.prompt, "phrases": list(case.phrases), "seed": seed,
                                               "wall_s": round(time.perf_counter() - t0, 2)}, indent=2))
    return text + f"wrote {out}/ (composition.png, routing_grid.png, route_overlay.png, verdict.txt) in {time.perf_counter() - t0:.1f}s"
