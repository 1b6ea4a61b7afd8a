"""Shared helpers for the training tests: the tiny config with absolute paths.

``tiny_pipeline()`` trains its toy tokenizers afresh on every call, and the Unigram trainer orders
tied pieces differently from one build to the next, so two builds can map a word to different ids.
Runs that must match bit for bit (resume tests) therefore share one base pipeline, deep-copied
into every run (see the ``shared_tiny`` fixture of test_train.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from musar.train.config import TrainConfig, ValidationPrompt, load_config

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"


def tiny_config(output_dir: Path, *overrides: str, **fields: Any) -> TrainConfig:
    """configs/tiny.yaml with repo-absolute paths, on CPU, tensorboard off, ``key=value`` overrides.

    CPU even on a GPU machine: the exactness tests compare bits, and CUDA kernels (atomics in
    some backward passes) need not be bitwise deterministic.
    """
    cfg = load_config(TINY_YAML, [f"output_dir={output_dir}", "report_to=[none]", "model.device=cpu", *overrides])
    data = dataclasses.replace(cfg.data, source=str(REPO / cfg.data.source))
    prompts = [
        ValidationPrompt(p.prompt, [(str(REPO / path), phrase) for path, phrase in p.subjects])
        for p in cfg.validation.prompts
    ]
    validation = dataclasses.replace(cfg.validation, prompts=prompts)
    return dataclasses.replace(cfg, data=data, validation=validation, **fields).check()
