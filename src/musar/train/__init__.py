"""Training MUSAR's dual-branch LoRA on the 3-stage curriculum (issue 5; docs/design.md sec. 5-7).

Typical use::

    from musar.train import load_config, train
    result = train(load_config("configs/tiny.yaml", ["max_steps=10"]))
    result.lora_path  # -> loads with load_pipeline(preset="tiny", lora=...)

From the shell: ``musar train --config FILE [--max-steps N] [--output-dir DIR] [--resume latest|PATH]``,
or ``accelerate launch --config_file configs/accelerate/ddp.yaml -m musar.cli train ...`` for
several GPUs. See docs/training.md.
"""

from __future__ import annotations

from musar.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "CurriculumConfig": "musar.data.curriculum_config",
    "DataConfig": "musar.train.config",
    "ModelConfig": "musar.train.config",
    "ObjectiveConfig": "musar.train.config",
    "OptimConfig": "musar.train.config",
    "TrainConfig": "musar.train.config",
    "ValidationConfig": "musar.train.config",
    "ValidationPrompt": "musar.train.config",
    "dump_config": "musar.train.config",
    "load_config": "musar.train.config",
    "StepResult": "musar.train.loop",
    "Trainer": "musar.train.loop",
    "TrainingInterrupted": "musar.train.loop",
    "TrainingStopped": "musar.train.loop",
    "TrainResult": "musar.train.loop",
    "TrainState": "musar.train.loop",
    "train": "musar.train.loop",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports("musar.train", _EXPORTS)
