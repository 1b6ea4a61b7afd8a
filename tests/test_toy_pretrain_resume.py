"""A stopped toy pretraining resumes from its newest checkpoint bit-exactly (musar.toy.pretrain_state)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lock_holder import lock_held_elsewhere
from musar.errors import MusarError
from musar.pipelines.pipeline_musar import MusarPipeline
from musar.toy.pretrain import PretrainConfig, load_pretrain_config, pretrain
from musar.toy.pretrain_state import state_dir
from musar.train.checkpoint import list_checkpoints
from musar.train.loop import TrainingInterrupted

TINY = ["steps=6", "checkpoint_every=2", "batch_size=2", "scenes=16", "diptychs=8", "diptych_every=2", "log_every=1",
        "codec.steps=2", "codec.batch_size=2", "codec.log_every=1", "text_mlm_steps=3", "grounding_weight=0.2",
        "ema_decay=0.9", "warmup=1", "threads=1"]


def _config(*extra: str) -> PretrainConfig:
    return load_pretrain_config("configs/toy_base.yaml", [*TINY, *extra])


def _weights(pipe: MusarPipeline) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v for m in ("transformer", "vae", "text_encoder", "text_encoder_2")
            for k, v in getattr(pipe, m).state_dict().items()}


def _probe_then(action: dict[int, str]) -> Callable[[int, MusarPipeline], dict[str, object]]:
    """A probe callback that records the step and, at the steps named, stops the run one way or another."""
    def callback(step: int, pipe: MusarPipeline) -> dict[str, object]:
        if action.get(step) == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves after this step and raises
        elif action.get(step) == "crash":
            raise RuntimeError("killed")  # no checkpoint of this step: the previous one is used
        return {"seen": step}
    return callback


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], dict]:
    out = tmp_path_factory.mktemp("whole")
    pipe, info = pretrain(_config(), out, log=lambda _: None, callback=_probe_then({}), callback_every=1)
    assert not list_checkpoints(state_dir(out))  # deleted once the base is saved
    return _weights(pipe), info


@pytest.mark.parametrize(("stop", "resumed_at"), [("sigterm", 3), ("crash", 4)])
def test_a_stopped_pretraining_resumes_bit_exactly(
    tmp_path: Path, uninterrupted: tuple[dict[str, torch.Tensor], dict], stop: str, resumed_at: int
) -> None:
    whole, whole_info = uninterrupted
    at = {"sigterm": 3, "crash": 5}[stop]
    with pytest.raises(TrainingInterrupted if stop == "sigterm" else RuntimeError):
        pretrain(_config(), tmp_path, log=lambda _: None, callback=_probe_then({at: stop}), callback_every=1)
    assert not (tmp_path / "base").exists()
    assert [s for s, _ in list_checkpoints(state_dir(tmp_path))] == [resumed_at]

    lines: list[str] = []
    pipe, info = pretrain(_config(), tmp_path, log=lines.append, callback=_probe_then({}), callback_every=1)
    assert any("resuming from" in line for line in lines)
    assert not any(line.startswith("pretrain: codec") for line in lines)  # the codec was not retrained
    assert info["resumed_from_step"] == resumed_at
    resumed = _weights(pipe)
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert info["loss_history"] == whole_info["loss_history"] and info["probes"] == whole_info["probes"]
    def timeless(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "wall_s"}
    assert timeless(info["codec"]) == timeless(whole_info["codec"]) and timeless(info["text"]) == timeless(whole_info["text"])
    assert json.loads((tmp_path / "pretrain.json").read_text())["resumed_from_step"] == resumed_at


def test_a_changed_recipe_refuses_to_resume_and_force_starts_over(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        pretrain(_config(), tmp_path, log=lambda _: None, callback=_probe_then({3: "crash"}), callback_every=1)
    with pytest.raises(MusarError, match=r"cannot resume .*step_00000002.*lr: 0\.001 -> 0\.002.*--force"):
        pretrain(_config("lr=2e-3"), tmp_path, log=lambda _: None)
    # threads, log_every and checkpoint_every change neither the weights nor the data: free
    assert pretrain(_config("log_every=3", "checkpoint_every=0"), tmp_path, log=lambda _: None)[1]["resumed_from_step"] == 2
    (tmp_path / "base").rename(tmp_path / "first")
    with pytest.raises(RuntimeError):
        pretrain(_config(), tmp_path, log=lambda _: None, callback=_probe_then({3: "crash"}), callback_every=1)
    _, info = pretrain(_config("lr=2e-3"), tmp_path, log=lambda _: None, force=True)
    assert info["resumed_from_step"] == 0 and info["config"]["lr"] == 2e-3


def test_pretraining_is_a_function_of_its_seed(tmp_path: Path, uninterrupted: tuple[dict[str, torch.Tensor], dict]) -> None:
    torch.manual_seed(12345)  # whatever the global RNG holds (the T5 phase's head once drew from it)
    pipe, _ = pretrain(_config(), tmp_path, log=lambda _: None, callback=_probe_then({}), callback_every=1)
    again = _weights(pipe)
    assert all(torch.equal(again[k], v) for k, v in uninterrupted[0].items())


def test_a_second_pretraining_into_the_same_folder_fails_at_once(tmp_path: Path) -> None:
    from musar.utils.run_lock import FolderInUse

    with lock_held_elsewhere(state_dir(tmp_path), "toy pretraining"):
        with pytest.raises(FolderInUse, match="in use by another"):
            pretrain(_config(), tmp_path, log=lambda _: None)
        assert not (tmp_path / "base").exists()
