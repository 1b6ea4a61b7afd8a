"""``musar toy demo``: a real two-subject composition from the shipped toy weights, on CPU.

Loads ``load_pipeline(preset="toy")`` (trained base + full MUSAR LoRA, package data), composes the
two reference images under ``examples/toy/`` (rendered from held-out identities if missing), writes
the image, the references, routing maps and the analyser's verdict, and prints the verdict.
"""

from __future__ import annotations

import time
from pathlib import Path

from musar.toy.analyser import Verdict, evaluate, object_phrase
from musar.toy.cases import Case, generate_case, make_cases
from musar.toy.metrics import late_steps, routing_accuracy, scene_token_labels
from musar.toy.sampling import AffinityTap, tapped
from musar.toy.world import subject_phrase, where
from musar.utils.io import atomic_write_json, atomic_write_text

EXAMPLES = Path("examples/toy")
DEMO_CASE = 4  # a same-shape held-out pair: the case routing exists for
# Fixed in a commit before the training of the weights shipped with issue 21, never changed after
# seeing results: one case per subject count (index into make_cases(..., subjects=c) at the
# report's seed), and a contact sheet of 8 more held-out cases drawn at their own seed.
SCALE_CASES: dict[int, int] = {3: 0, 4: 0}
SHEET_SEED = 4321
SHEET_COUNTS: tuple[int, ...] = (2, 2, 2, 2, 3, 3, 4, 4)


def demo_case() -> Case:
    return make_cases(DEMO_CASE + 1)[DEMO_CASE]


def scale_case(subjects: int) -> Case:
    """The demo's fixed case with ``subjects`` (3 or 4) references."""
    index = SCALE_CASES[subjects]
    return make_cases(index + 1, subjects=subjects)[index]


def sheet_cases() -> list[Case]:
    """The contact sheet's 8 held-out cases: case i of make_cases(8, SHEET_SEED, subjects=c_i)."""
    per_count = {c: make_cases(len(SHEET_COUNTS), SHEET_SEED, subjects=c) for c in set(SHEET_COUNTS)}
    return [per_count[c][i] for i, c in enumerate(SHEET_COUNTS)]


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


def verdict_text(verdict: Verdict, phrases: tuple[str, ...], routing: float) -> str:
    """A few lines a person reads at a glance: what each reference became, leaks, routing."""
    lines = []
    for phrase, sub in zip(phrases, verdict.subjects, strict=True):
        ref = subject_phrase(sub.reference, article=True)
        o = sub.detected
        seen = "nothing" if o is None else f"a {object_phrase(o)} {where(o.region)}"
        lines.append(f"  {phrase!r} <- {ref}: drew {seen} ({sum(sub.matches)}/4 attributes)")
    ground = "as prompted" if verdict.background_ok else "NOT as prompted"
    lines.append(f"  background {verdict.analysis.background} ({ground}); routing accuracy {routing:.2f}")
    ok = verdict.all_present and verdict.leaks == 0
    problems = ([] if verdict.all_present else ["a subject is missing or wrong"]) + (
        [f"{verdict.leaks} attribute(s) leaked between subjects"] if verdict.leaks else [])
    lines.append("verdict: " + ("both subjects present, nothing leaked" if ok else "; ".join(problems)))
    return "\n".join(lines)


def run_demo(out: str | Path, seed: int = 0, examples: str | Path = EXAMPLES) -> str:
    """Generate the demo composition; returns the verdict text (also written to verdict.txt)."""
    from PIL import Image

    from musar.pipelines.presets import load_pipeline
    from musar.pipelines.routing_maps import save_routing_maps

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    case = demo_case()
    refs = case.reference_images()
    ex = Path(examples)
    if (ex / "ref_a.png").is_file() and (ex / "ref_b.png").is_file():
        refs = [Image.open(ex / "ref_a.png").convert("RGB"), Image.open(ex / "ref_b.png").convert("RGB")]
    pipe = load_pipeline(preset="toy", device="cpu")
    tap = AffinityTap()
    with tapped(pipe.transformer, tap):
        images, result = generate_case(pipe, case, (seed,), return_routing=True, references=refs)
        tap.flush()
    image = images[0]
    big = image.resize((256, 256), Image.NEAREST)
    image.save(out / "composition.png")
    big.save(out / "composition_x4.png")
    for name, ref in zip(("ref_a.png", "ref_b.png"), refs, strict=True):
        ref.save(out / name)
    save_routing_maps(result, big, case.phrases, out)
    routes = tap.all_routes()  # (steps, layers, 1, n)
    steps = routes.shape[0]
    accuracy = routing_accuracy(routes[late_steps(steps)], scene_token_labels(case.scene))
    verdict = evaluate(image, case.identities, case.scene)
    text = f"prompt: {case.prompt}\n" + verdict_text(verdict, case.phrases, accuracy) + "\n"
    atomic_write_text(out / "verdict.txt", text + "\nanalyser, in full:\n" + verdict.describe() + "\n")
    atomic_write_json(out / "demo.json", {"prompt": case.prompt, "phrases": list(case.phrases), "seed": seed,
                                          "both_present": verdict.all_present, "leaks": verdict.leaks,
                                          "routing_accuracy": accuracy, "steps": steps,
                                          "wall_s": round(time.perf_counter() - t0, 2)})
    return text + f"wrote {out}/ (composition.png, routing_grid.png, route_overlay.png, verdict.txt) in {time.perf_counter() - t0:.1f}s"
