"""Where does the same-shape leak of the toy demo enter? A measurement script (issue 21, item 3).

Not library code: it runs the shipped (or any) toy weights under interventions and scores each with
the analyser. Each intervention removes one candidate path and leaves the rest as they are:

* ``given_routes``: routes from the true layout (boxes) at every layer and step, so no token reads
  the wrong reference while routes settle;
* ``noise_branch_off``: the rank-4 noise branch of the LoRA scaled to 0;
* ``isolate_noise``: a NOISE query sees only NOISE keys routed to its own subject;
* ``isolate_cond``: condition k's queries see only NOISE keys routed to k;
* ``isolate_all``: both, and PROMPT queries see no NOISE key, so no path at all carries
  anything from one subject's reference into another subject's tokens;
* ``refs_both_a``: both references are the demo's first (plain) subject: no dots anywhere;
* ``a_alone``: the first subject alone at its place (one reference);
* ``swapped``: the two subjects trade places and phrases;
* ``no_another``: both phrases ``diamond`` (the prompt says "a diamond ... and a diamond ...").

The isolations are applied to the ``reference`` backend's dense mask (wrapping
``musar.models.routing.routed_mask`` for this process only); ``paper`` on that backend equals
``fast`` exactly (checked as the first two rows).

    .venv/bin/python bench/toy_leak.py --out outputs/toy_leak [--base DIR --lora FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import musar.models.attention as attention_module
from musar.models.routing import routed_mask
from musar.toy import world
from musar.toy.analyser import evaluate
from musar.toy.cases import GEN_DEFAULTS, Case, layout_boxes, make_cases
from musar.toy.demo import demo_case
from musar.toy.metrics import attribute_rates, entanglement
from musar.utils.io import atomic_write_json

ISOLATE = {"noise": False, "cond": False, "prompt": False}


def _isolating_mask(layout, routes, **rules):  # type: ignore[no-untyped-def]
    mask = routed_mask(layout, routes, **rules)
    if routes is None or not any(ISOLATE.values()):
        return mask
    r = routes if routes.dim() == 3 else routes[:, None]  # (B, H, n)
    ns = layout.noise_slice
    mask = mask.clone()
    if ISOLATE["noise"]:
        mask[:, :, ns, ns] &= r[..., :, None] == r[..., None, :]
    if ISOLATE["cond"]:
        cond = layout.cond_ids(routes.device)
        for k in range(layout.num_conditions):
            rows = (cond == k).nonzero().squeeze(1)
            block = mask[:, :, rows]
            block[:, :, :, ns] &= (r == k)[:, :, None, :]
            mask[:, :, rows] = block
    if ISOLATE["prompt"]:
        mask[:, :, layout.prompt_slice, ns] = False
    return mask


def _noise_branch(pipe, scale: float) -> None:  # type: ignore[no-untyped-def]
    for module in pipe.transformer.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "noise" in scaling:
            module._full_noise_scale = getattr(module, "_full_noise_scale", scaling["noise"])
            scaling["noise"] = module._full_noise_scale * scale


def _score(pipe, cases: list[Case], seeds: range | tuple[int, ...], attention: str = "reference",  # type: ignore[no-untyped-def]
           boxes: bool = False, refs: Callable[[Case], list] | None = None,
           edit: Callable[[Case], tuple[str, tuple[str, ...], Case]] | None = None) -> dict[str, object]:
    verdicts, right = [], []
    for case in cases:
        prompt, phrases, target = edit(case) if edit else (case.prompt, case.phrases, case)
        images = refs(case) if refs else target.reference_images()
        for s in seeds:
            out = pipe(prompt, list(zip(images, phrases, strict=True)), height=64, width=64,
                       generator=torch.Generator().manual_seed(s), attention=attention, progress=False,
                       boxes=layout_boxes(target) if boxes else None, **GEN_DEFAULTS)
            v = evaluate(out.images[0], target.identities, target.scene)
            verdicts.append(v)
            right.append(v.all_present and v.leaks == 0)
    rates = attribute_rates(verdicts)
    out = {"composed_right": float(np.mean(right)), "all_present": rates["all_present"][0], "fidelity": rates["fidelity"][0]}
    if len(target.identities) > 1:
        out["entanglement"] = entanglement(verdicts)[0]
    out["fidelity_per_slot"] = [round(float(np.mean([v.subjects[k].fidelity for v in verdicts])), 3)
                                for k in range(len(target.identities))]
    return out


def _swapped(case: Case) -> tuple[str, tuple[str, ...], Case]:
    a, b = case.scene.placements
    scene = world.Scene(case.scene.background, (world.Placement(b.identity, a.region, a.scale),
                                                world.Placement(a.identity, b.region, b.scale)), case.scene.size)
    swapped = Case(case.index, (b.identity, a.identity), scene, case.references[::-1], case.same_category)
    return swapped.prompt, swapped.phrases, swapped


def _alone(case: Case) -> tuple[str, tuple[str, ...], Case]:
    scene = world.Scene(case.scene.background, case.scene.placements[:1], case.scene.size)
    alone = Case(case.index, case.identities[:1], scene, case.references[:1], False)
    return alone.prompt, alone.phrases, alone


def _no_another(case: Case) -> tuple[str, tuple[str, ...], Case]:
    shape = case.identities[0].shape
    return case.prompt.replace(f"another {shape}", f"a {shape}"), (shape, shape), case


INTERVENTIONS: dict[str, dict[str, object]] = {
    "paper_fast": {"attention": "fast"},
    "paper": {},
    "given_routes": {"boxes": True},
    "noise_branch_off": {"_noise": 0.0},
    "isolate_noise": {"_iso": ("noise",)},
    "isolate_cond": {"_iso": ("cond",)},
    "isolate_all": {"_iso": ("noise", "cond", "prompt")},
    "refs_both_a": {"refs": lambda c: [c.reference_images()[0]] * 2},
    "a_alone": {"edit": _alone},
    "swapped": {"edit": _swapped},
    "no_another": {"edit": _no_another},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/toy_leak", help="folder for leak.json (default outputs/toy_leak)")
    parser.add_argument("--base", default=None, help="toy base folder (default: the shipped weights)")
    parser.add_argument("--lora", default=None, help="MUSAR LoRA of that base (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--rows", nargs="+", default=list(INTERVENTIONS), choices=list(INTERVENTIONS), metavar="ROW",
                        help="interventions to run (default all): " + ", ".join(INTERVENTIONS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    attention_module.routed_mask = _isolating_mask  # the reference backend's mask, this process only
    if args.base:
        from musar.toy.model import load_toy_pipeline

        pipe = load_toy_pipeline(Path(args.base), lora=args.lora)
    else:
        from musar.pipelines.presets import load_pipeline

        pipe = load_pipeline(preset="toy", device="cpu")
    demo = [demo_case()]
    same = [c for c in make_cases(24) if c.same_category]
    results: dict[str, object] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.rows:
        kw = dict(INTERVENTIONS[name])
        iso = kw.pop("_iso", ())
        for key in ISOLATE:
            ISOLATE[key] = key in iso  # type: ignore[operator]
        _noise_branch(pipe, float(kw.pop("_noise", 1.0)))  # type: ignore[arg-type]
        t0 = time.perf_counter()
        results[name] = {"demo_case_8_seeds": _score(pipe, demo, range(8), **kw),  # type: ignore[arg-type]
                         "same_shape_12_cases_x_2_seeds": _score(pipe, same, (0, 1), **kw)}  # type: ignore[arg-type]
        _noise_branch(pipe, 1.0)
        print(json.dumps({name: results[name], "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
        atomic_write_json(out / "leak.json", results)


if __name__ == "__main__":
    main()
