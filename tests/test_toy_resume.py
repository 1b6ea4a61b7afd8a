"""A toy variant stopped mid-training resumes where it stopped (issue 21, item 6).

At the shipped recipe one variant trains for about 55 minutes on 2 cores, so a chain that is
interrupted must not start that variant over. Trained here for 8 steps on the shipped base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lock_holder import lock_held_elsewhere
from musar.errors import MusarError
from musar.toy.model import SHIPPED_BASE

pytestmark = pytest.mark.skipif(not (SHIPPED_BASE / "model_index.json").is_file(), reason="the toy base is not shipped")

SHORT = ("curriculum.stage1_steps=4", "curriculum.stage2_steps=2", "curriculum.stage3_steps=2", "optim.batch_size=2",
         "optim.warmup_steps=1", "log_every=1", "checkpoint_every=2", "model.cpu_threads=1")


def _toy_folder(tmp_path: Path) -> Path:
    from musar.toy.stages import data

    out = tmp_path / "toy"
    shutil.copytree(SHIPPED_BASE, out / "base")
    data(out, 32)
    return out


def test_an_interrupted_variant_resumes_bit_exactly_and_refuses_a_changed_config(tmp_path: Path) -> None:
    from musar.toy.variants import train_variant, variant_dir
    from musar.train.checkpoint import list_checkpoints

    out = _toy_folder(tmp_path)
    folder = variant_dir(out, "full")
    lora = train_variant("full", out, extra=SHORT, log=lambda _: None)
    uninterrupted = load_file(lora)
    # Once the LoRA exists only the end of stage 1 stays (gate 2 reads it); the rest were for resuming.
    assert [step for step, _ in list_checkpoints(folder)] == [4]

    # Killed after the stage-1 checkpoint: no LoRA, no wall.json.
    lora.unlink()
    (folder / "wall.json").unlink()
    said: list[str] = []
    resumed = train_variant("full", out, extra=SHORT, log=said.append)
    assert any("resuming from" in line and "(step 4)" in line for line in said), said
    again = load_file(resumed)
    assert again.keys() == uninterrupted.keys()
    assert all(torch.equal(again[k], uninterrupted[k]) for k in again)
    wall = json.loads((folder / "wall.json").read_text())
    assert wall["resumed_from_step"] == 4 and wall["calls"] == 2 and wall["steps"] == 8

    # A resume under another config would train a different run under the old name: refused.
    resumed.unlink()
    with pytest.raises(MusarError, match=r"cannot resume .*optim\.lr.*--force"):
        train_variant("full", out, extra=(*SHORT, "optim.lr=0.5"), log=lambda _: None)
    # --force starts over from step 0.
    said.clear()
    train_variant("full", out, extra=(*SHORT, "optim.lr=0.5"), force=True, log=said.append)
    assert not any("resuming" in line for line in said)
    assert json.loads((folder / "wall.json").read_text())["resumed_from_step"] == 0


def test_checkpoint_cadence_does_not_change_what_is_learned(tmp_path: Path) -> None:
    from musar.toy.variants import train_variant

    out = _toy_folder(tmp_path)
    every_two = load_file(train_variant("no_dynamic", out, extra=SHORT, log=lambda _: None))
    only_end = load_file(train_variant("no_dynamic", out, extra=(*SHORT, "checkpoint_every=0"), force=True,
                                       log=lambda _: None))
    assert all(torch.equal(every_two[k], only_end[k]) for k in every_two)


def test_a_second_training_of_the_same_variant_fails_at_once_and_clears_nothing(tmp_path: Path) -> None:
    from musar.toy.variants import train_variant, variant_dir
    from musar.utils.run_lock import FolderInUse

    out = _toy_folder(tmp_path)
    folder = variant_dir(out, "full")
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("{}\n")  # what the first run has written so far
    with lock_held_elsewhere(folder, "training run"):
        with pytest.raises(FolderInUse, match="in use by another"):
            train_variant("full", out, extra=SHORT, log=lambda _: None)
        assert (folder / "metrics.jsonl").is_file()
