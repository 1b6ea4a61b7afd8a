"""Does the base's same-identity prior cause the same-shape leak? (issue 21, item 3, last candidate)

A measurement script, not library code. It continues pretraining a toy base (default: the shipped
one) for ``--steps`` more steps with the base recipe, changing one key, so the treatment and its
control differ in that key only:

    .venv/bin/python bench/toy_prior.py --out runs/prior0 --set same_identity_prob=0.0   # treatment
    .venv/bin/python bench/toy_prior.py --out runs/prior5 --set same_identity_prob=0.5   # control

Then `musar toy data/train --out DIR` trains the full LoRA on ``DIR/base`` and
``bench/toy_leak.py --base DIR/base --lora DIR/musar/full/lora.safetensors --rows paper`` scores the
demo's fixed case (8 seeds) and 12 same-shape cases. Continuing from the shipped base costs minutes;
pretraining from scratch costs an hour on 2 cores, which one session cannot afford twice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import musar.toy.pretrain as pretrain_module
from musar.toy.model import SHIPPED_BASE, load_toy_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="working folder; the base lands in OUT/base")
    parser.add_argument("--base", default=str(SHIPPED_BASE), help="toy base to continue from (default: shipped)")
    parser.add_argument("--config", default="configs/toy_base.yaml", help="base recipe (default configs/toy_base.yaml)")
    parser.add_argument("--steps", type=int, default=1000, help="steps to continue for (default 1000)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    base = Path(args.base)
    start = load_toy_pipeline(base, use_shipped_lora=False)
    # The recipe builds a fresh random pipeline; continuing means handing it the trained one instead.
    pretrain_module.build_toy_pipeline = lambda seed=0, sizes=None: start  # type: ignore[assignment]
    overrides = [f"steps={args.steps}", "warmup=50", "text_mlm_steps=0", f"codec_from={base}", *args.overrides]
    cfg = pretrain_module.load_pretrain_config(args.config, overrides)
    pretrain_module.pretrain(cfg, args.out)


if __name__ == "__main__":
    main()
