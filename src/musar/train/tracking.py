"""Where training numbers go: ``metrics.jsonl`` always, TensorBoard by default, W&B if installed.

Only the main process writes. ``metrics.jsonl`` has one record per step (loss, lr, stage, ...);
it is the machine-readable log the tests and scripts read, and on resume it is cut back to the
checkpoint's step so a resumed run's log reads like an uninterrupted one.

TensorBoard and W&B are accelerate's trackers: :func:`trackers` builds them for the Accelerator
(``log_with``), :class:`Tracker` starts them (``init_trackers``) and logs through them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker
from accelerate.utils import is_tensorboard_available, is_wandb_available
from PIL import Image

from musar.utils.io import atomic_write_text
from musar.utils.safe_load import read_lines

METRICS_FILE = "metrics.jsonl"
# ~300 bytes a record: a million logged steps is 300 MB. Above this it is not our log.
MAX_METRICS_BYTES = 512 * 1024 * 1024
WANDB_PROJECT = "musar"


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return read_lines(path, "metrics log", expect=dict, max_bytes=MAX_METRICS_BYTES)


def truncate_metrics(output_dir: str | Path, step: int) -> None:
    """Drop records after ``step`` (they belong to a run that is being resumed from earlier)."""
    records = [r for r in read_metrics(output_dir) if r.get("step", 0) <= step]
    path = Path(output_dir) / METRICS_FILE
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def trackers(output_dir: str | Path, report_to: list[str], config: dict[str, Any]) -> list[GeneralTracker]:
    """accelerate's tracker objects for ``report_to``, leaving out those whose package is missing.

    Objects rather than names: from names accelerate gives every tracker one run name, so
    TensorBoard would write to ``<output_dir>/<W&B project>`` instead of ``<output_dir>/tensorboard``.
    Nothing starts here; :class:`Tracker` starts them on the main process.
    """
    out: list[GeneralTracker] = []
    if "tensorboard" in report_to and is_tensorboard_available():
        out.append(TensorBoardTracker("tensorboard", str(output_dir)))
    if "wandb" in report_to and is_wandb_available():
        # The config goes to wandb.init: through init_trackers it would also become TensorBoard
        # hparams, which need flat values and add a folder per start.
        out.append(WandBTracker(WANDB_PROJECT, config=config, dir=str(output_dir), resume="allow"))
    return out


class Tracker:
    """Records to metrics.jsonl; scalars and images to the accelerator's trackers (main process only)."""

    def __init__(self, output_dir: str | Path, accelerator: Accelerator, report_to: list[str]) -> None:
        self.acc = accelerator
        self.enabled = accelerator.is_main_process
        self.output_dir = Path(output_dir)
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Written by hand, not through a tracker: a resume cuts it back to the checkpoint's step
        # (truncate_metrics) and tests and scripts read it line by line; no tracker keeps either.
        self._metrics = (self.output_dir / METRICS_FILE).open("a", encoding="utf-8")
        accelerator.init_trackers(WANDB_PROJECT)
        started = {t.name for t in accelerator.trackers}
        if "tensorboard" in report_to and "tensorboard" not in started:
            warnings.warn("tensorboard is not installed; scalars go to metrics.jsonl only "
                          "(pip install 'musar[train]')", stacklevel=2)
        if "wandb" in report_to and "wandb" not in started:
            warnings.warn("report_to lists wandb but it is not installed; skipping it", stacklevel=2)

    def record(self, record: dict[str, Any]) -> None:
        """One JSON line per step."""
        if self.enabled:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.enabled:
            self.acc.log(values, step=step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        if not self.enabled:
            return
        for tracker in self.acc.trackers:
            # Each in the form its logger takes: TensorBoard's add_images a batch array, W&B a PIL list.
            if tracker.name == "tensorboard":
                tracker.log_images({tag: np.asarray(image.convert("RGB"))[None]}, step, dataformats="NHWC")
            else:
                tracker.log_images({tag: [image]}, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        # Not accelerator.end_training(): it also destroys the process group, which accelerate's
        # shared state keeps for every later Accelerator of this process.
        for tracker in self.acc.trackers:
            tracker.finish()
        self.enabled = False
