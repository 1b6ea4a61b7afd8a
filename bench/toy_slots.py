"""Does a c = 4 failure follow the subject's region, its place in the caption, or its reference's
condition slot? (issue 21: what fails at c = 4)

A measurement script, not library code. Each held-out four-subject case is generated three ways
with the shipped toy weights, same seeds:

* as the case gives it: subject k is mentioned k-th in the caption, drawn in region k, and its
  (reference, phrase) pair takes condition slot k;
* slots reversed: the same prompt and pairs, handed to the pipeline in reverse order, so only the
  condition slot (RoPE offset) of each reference changes;
* caption reversed: the same subjects in the same regions, but the scene lists them in reverse
  order, so the caption mentions them (and the pairs follow) in reverse.

It prints, per region, caption position and slot, how many subjects came out with a wrong shape
or body colour. ``--routing`` also prints, for the cases as given, each region's routing accuracy
(the share of its NOISE tokens routed to its own reference, late steps, every layer). ``--base`` instead asks the base alone (no LoRA, no references) for the full
captions in both orders, to tell what the caption's order does to the base:

    .venv/bin/python bench/toy_slots.py --cases 24 --seeds 0 1
    .venv/bin/python bench/toy_slots.py --cases 24 --seeds 0 1 --routing
    .venv/bin/python bench/toy_slots.py --cases 24 --seeds 0 1 --base
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter

import torch

from musar.toy.analyser import evaluate
from musar.toy.cases import GEN_DEFAULTS, IMAGE_SIZE, Case, make_cases
from musar.toy.model import load_toy_pipeline


def reversed_caption(case: Case) -> Case:
    """The same picture, its subjects listed (captioned, referenced) in reverse order."""
    return dataclasses.replace(case, identities=case.identities[::-1], references=case.references[::-1],
                               scene=dataclasses.replace(case.scene, placements=case.scene.placements[::-1]))


def base_only(cases: list[Case], seeds: list[int]) -> None:
    from musar.toy.sampling import sample_text_only

    pipe = load_toy_pipeline(use_shipped_lora=False)
    for name, chosen in (("as the case gives it", cases), ("caption reversed", [reversed_caption(c) for c in cases])):
        flat = [c for c in chosen for _ in seeds]
        images = sample_text_only(pipe, [c.full_prompt for c in flat], [s for _ in chosen for s in seeds])
        right = sum(evaluate(im, c.identities, c.scene).all_present for im, c in zip(images, flat, strict=True))
        print(f"base, full caption, {name}: all present {right}/{len(flat)}")


def routing_by_region(cases: list[Case], seeds: list[int]) -> None:
    import numpy as np

    from musar.toy.cases import generate_case
    from musar.toy.metrics import late_steps, scene_token_labels
    from musar.toy.sampling import STEPS, AffinityTap, tapped

    pipe, tap = load_toy_pipeline(), AffinityTap()
    routed: dict[str, list[float]] = {}
    wrong: Counter = Counter()
    with tapped(pipe.transformer, tap):
        for case in cases:
            labels = scene_token_labels(case.scene)
            for seed in seeds:
                tap.records = {}
                images, _ = generate_case(pipe, case, (seed,))
                tap.flush()
                late = tap.batches[-1][late_steps(STEPS)][:, :, 0]  # (steps, layers, tokens)
                verdict = evaluate(images[0], case.identities, case.scene)
                for k, placement in enumerate(case.scene.placements):
                    mine = late[:, :, labels == k]
                    if mine.size:
                        routed.setdefault(placement.region, []).append(float((mine == k).mean()))
                    wrong[placement.region] += not verdict.subjects[k].present
    for region, accs in sorted(routed.items()):
        print(f"{region}: routing accuracy {np.mean(accs):.3f} (lowest image {min(accs):.2f}); wrong subjects {wrong[region]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base", action="store_true", help="the base from full captions, both orders")
    parser.add_argument("--routing", action="store_true", help="routing accuracy per region, cases as given")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.subjects
    cases = make_cases(args.cases, subjects=n)
    if args.base:
        base_only(cases, args.seeds)
        return
    if args.routing:
        routing_by_region(cases, args.seeds)
        return
    pipe = load_toy_pipeline()
    ways = (("as the case gives it", False, False), ("slots reversed", True, False), ("caption reversed", False, True))
    for name, flip_slots, flip_caption in ways:
        by_region, by_mention, by_slot, images, right = Counter(), Counter(), Counter(), 0, 0
        for case in cases:
            case = reversed_caption(case) if flip_caption else case
            pairs = list(zip(case.reference_images(), case.phrases, strict=True))
            slots = list(range(n))[::-1] if flip_slots else list(range(n))  # slot s holds pair slots[s]
            for seed in args.seeds:
                out = pipe(case.prompt, [pairs[k] for k in slots], height=IMAGE_SIZE, width=IMAGE_SIZE,
                           generator=torch.Generator().manual_seed(seed), attention="fast", progress=False,
                           **GEN_DEFAULTS)  # type: ignore[arg-type]
                verdict = evaluate(out.images[0], case.identities, case.scene)
                images += 1
                right += verdict.all_present
                for k, subject in enumerate(verdict.subjects):
                    if not subject.present:  # shape or body colour wrong
                        by_region[case.scene.placements[k].region] += 1
                        by_mention[k] += 1
                        by_slot[slots.index(k)] += 1
        print(f"{name}: all present {right}/{images}; wrong subjects (of {images} each) by region "
              + ", ".join(f"{r} {c}" for r, c in sorted(by_region.items()))
              + "; by caption position " + ", ".join(f"{k + 1}: {by_mention[k]}" for k in range(n))
              + "; by slot " + ", ".join(f"{s + 1}: {by_slot[s]}" for s in range(n)))


if __name__ == "__main__":
    main()
