"""Where training numbers go: ``metrics.jsonl`` always, TensorBoard by default, W&B if installed.

Only the main process writes. ``metrics.jsonl`` has one record per step (loss, lr, stage, ...);
it is the machine-readable log the tests and scripts read, and on resume it is cut back to the
checkpoint's step so a resumed run's log reads like an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from musar.utils.io import atomic_write_text
from musar.utils.safe_load import read_lines

METRICS_FILE = "metrics.jsonl"
# ~300 bytes a record: a million logged steps is 300 MB. Above this it is not our log.
MAX_METRICS_BYTES = 512 * 1024 * 1024


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


class Tracker:
    """Scalars and images to metrics.jsonl / TensorBoard / W&B (main process only)."""

    def __init__(
        self, output_dir: str | Path, report_to: list[str], config: dict[str, Any], *, enabled: bool, run_name: str = "musar"
    ) -> None:
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.tb: Any = None
        self.wandb: Any = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = (self.output_dir / METRICS_FILE).open("a", encoding="utf-8")
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed; scalars go to metrics.jsonl only "
                              "(pip install 'musar[train]')", stacklevel=2)
        if "wandb" in report_to:
            if importlib.util.find_spec("wandb") is None:
                warnings.warn("report_to lists wandb but it is not installed; skipping it", stacklevel=2)
            else:
                import wandb

                self.wandb = wandb.init(project=run_name, config=config, dir=str(self.output_dir), resume="allow")

    def record(self, record: dict[str, Any]) -> None:
        """One JSON line per step."""
        if self.enabled:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.enabled = False
