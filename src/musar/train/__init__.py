"""Training MUSAR's dual-branch LoRA on the 3-stage curriculum (issue 5; DESIGN sec. 5-7).

Typical use::

    from musar.train import load_config, train
    result = train(load_config("configs/tiny.yaml", ["max_steps=10"]))
    result.lora_path  # -> loads with load_pipeline(preset="tiny", lora=...)

From the shell: ``musar train --config FILE [--max-steps N] [--output-dir DIR] [--resume latest|PATH]``,
or ``accelerate launch --config_file configs/accelerate/ddp.yaml -m musar.cli train ...`` for
several GPUs. See docs/training.md.
"""

from musar.train.config import (
    CurriculumConfig,
    DataConfig,
    LoRAConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
    ValidationConfig,
    ValidationPrompt,
    dump_config,
    load_config,
)
from musar.train.loop import (
    StepResult,
    Trainer,
    TrainingInterrupted,
    TrainingStopped,
    TrainResult,
    TrainState,
    train,
)

__all__ = [
    "CurriculumConfig",
    "DataConfig",
    "LoRAConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "StepResult",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingInterrupted",
    "TrainingStopped",
    "ValidationConfig",
    "ValidationPrompt",
    "dump_config",
    "load_config",
    "train",
]
