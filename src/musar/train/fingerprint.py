"""What defines a training run, so that a resume continues *that* run and nothing else.

Every checkpoint records the run's whole config, flattened to dotted keys (``run_config`` in
trainer.json). Resuming compares it with the config of the new command: any key that differs,
other than those in :data:`RESUME_FREE`, refuses the resume with one line listing every
difference (``optim.lr: 0.001 -> 0.5``), before any model loads and before anything in the
output folder is rewritten. Without this, ``--set optim.lr=0.5`` on a resume kept the old
learning rate (the scheduler state comes from the checkpoint) while config.yaml claimed the new
one, and a different ``data.source`` was trained on silently.

A key the record lacks (it did not exist when the checkpoint was written) is not compared: its
default applies. A checkpoint written before records existed is resumed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from musar.errors import MusarError
from musar.train.config import TrainConfig, to_dict

RUN_CONFIG = "run_config"  # trainer.json key of the flattened config
RUN_FINGERPRINT = "run_fingerprint"  # trainer.json key of the digest of its defining part

# Keys a resume may change, with why: each changes how a run is observed, paced, placed or
# computed, not what it learns from, with which objective, or what it produces. A key names
# itself and everything under it.
RESUME_FREE: Mapping[str, str] = {
    "output_dir": "where the run lives; a run folder may be moved or copied, and --resume PATH may "
                  "continue a checkpoint of another folder",
    "max_steps": "extends (or ends earlier) the same run: `--resume latest --max-steps N` is how a run is "
                 "continued past its end; steps already taken are unchanged",
    "checkpoint_every": "checkpoint cadence",
    "keep_last": "how many checkpoints are kept",
    "log_every": "logging cadence",
    "validate_every": "validation-grid cadence",
    "validation": "the validation grid only observes the LoRA (prompts, size, steps, seed of the grid)",
    "report_to": "which trackers receive the logs",
    "max_nonfinite_in_a_row": "when to give up; raised after a stop to push through a bad patch",
    "data.num_workers": "DataLoader processes; the curriculum stream fixes the data order, not the workers",
    "data.cache_dir": "where hub data is cached, not which data",
    "data.text_cache_size": "an in-memory cache of text embeddings; same values either way",
    "model.cpu_threads": "intra-op CPU threads: speed only",
    "model.device": "which hardware runs the same computation (a run may move from CPU to GPU)",
    "model.attention": "which SDPA kernels compute the same attention",
    "model.gradient_checkpointing": "recomputes activations instead of storing them: memory for time",
}


def _free(key: str) -> bool:
    return any(key == free or key.startswith(f"{free}.") for free in RESUME_FREE)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"section.key": value}``; lists stay whole (a list is one setting)."""
    if isinstance(value, Mapping) and (value or not prefix):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


# Keys that hold a hub id or a local path: one file named relatively once and absolutely the next
# time is the same data, so local paths are compared by where they resolve.
PATH_KEYS = ("model.pretrained", "data.source", "data.musar_gen")


def _resolved(value: Any) -> Any:
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.realpath(value)
    return value


def run_config(cfg: TrainConfig) -> dict[str, Any]:
    """The flattened config as JSON stores it (tuples as lists), so a record compares equal to it;
    local paths resolved (:data:`PATH_KEYS`)."""
    flat = flatten(to_dict(cfg))
    flat.update({k: _resolved(flat[k]) for k in PATH_KEYS if k in flat})
    return json.loads(json.dumps(flat, default=str))


def defining(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not _free(k)}


def fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of the defining part of a flattened config (one string to tell runs apart)."""
    text = json.dumps(defining(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else f"{text[:77]}..."


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every defining key the record has and the current config changes."""
    lines = []
    for key in sorted(defining(recorded)):
        old, new = recorded[key], current.get(key, "(no such key)")
        if old != new:
            lines.append(f"{key}: {_show(old)} -> {_show(new)}")
    return lines


def check_resume_config(state: Mapping[str, Any], cfg: TrainConfig, where: str | os.PathLike[str]) -> bool:
    """Refuse a resume whose config differs from the checkpoint's in a defining key.

    ``state`` is the checkpoint's trainer.json. Returns False when the checkpoint has no record
    (written before records existed), True when it was compared and matches.
    """
    recorded = state.get(RUN_CONFIG)
    if recorded is None:
        return False
    if not isinstance(recorded, Mapping):  # validate_checkpoint refuses this; kept for direct callers
        raise MusarError(f"checkpoint {where}: {RUN_CONFIG} in trainer.json is not a mapping")
    changed = differences(recorded, run_config(cfg))
    if changed:
        raise MusarError(f"cannot resume {where}: the config differs from the run's in {len(changed)} key(s): "
                         f"{'; '.join(changed)}. Resume with the run's own config (see the run's config.yaml) or "
                         "start a new --output-dir; only these may change on resume: " + ", ".join(RESUME_FREE))
    return True


def is_main_launch_process() -> bool:
    """Rank 0 of a launched job (or a plain process), known before accelerate starts: the one
    process of a run that locks its folder and speaks for it."""
    return os.environ.get("RANK", "0") == "0"
