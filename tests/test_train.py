"""Training on the tiny preset, CPU: overfit, frozen base, exact resume, faults, curriculum, loading."""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from musar.errors import MusarError
from musar.lora import BranchLoRALinear, lora_named_parameters
from musar.train import Trainer, TrainingInterrupted, TrainingStopped, TrainResult, train
from musar.train.checkpoint import list_checkpoints
from musar.train.tracking import read_metrics

from train_fixtures import tiny_config


@pytest.fixture(scope="module")
def tiny_base() -> Any:
    from musar.pipelines.presets import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture(scope="module")
def patched(tiny_base: Any) -> Iterator[None]:
    """Every run builds its pipeline as a copy of one tiny base (see train_fixtures), on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a loaded 2-core machine stall for seconds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("musar.pipelines.presets.tiny_pipeline", lambda seed=0: copy.deepcopy(tiny_base))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, patched: None) -> TrainResult:
    """10 steps (4 + 3 + 3 curriculum) without interruption, validating every 5 steps."""
    out = tmp_path_factory.mktemp("straight")
    return train(tiny_config(out, "checkpoint_every=3", "keep_last=2", "validate_every=5"))


def lora_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def frozen_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    pipe = trainer.c.pipe
    state = {}
    for prefix, module in (("t", pipe.transformer), ("v", pipe.vae), ("c", pipe.text_encoder), ("x", pipe.text_encoder_2)):
        for name, tensor in module.state_dict().items():
            if ".lora_A." not in name and ".lora_B." not in name:
                state[f"{prefix}.{name}"] = tensor.detach().clone()
    return state


def nan_after(trainer: Trainer, monkeypatch: pytest.MonkeyPatch, bad_calls: set[int] | None = None, start: int | None = None) -> None:
    """Make compute_loss return NaN on the given call numbers (1-based) or from call ``start`` on."""
    real = trainer.compute_loss
    calls = {"n": 0}

    def compute_loss(batch: Any, seed: int) -> torch.Tensor:
        calls["n"] += 1
        loss = real(batch, seed)
        bad = (bad_calls is not None and calls["n"] in bad_calls) or (start is not None and calls["n"] >= start)
        return loss * float("nan") if bad else loss

    monkeypatch.setattr(trainer, "compute_loss", compute_loss)


def test_few_steps_overfit_a_fixed_batch(tmp_path: Path, patched: None) -> None:
    trainer = Trainer(tiny_config(tmp_path, "optim.lr=5e-2", "optim.warmup_steps=0", "curriculum.stage1_steps=0"))
    batches = trainer.next_batches()  # a diptych batch: routing and both LoRA branches are exercised
    losses = [trainer.train_step(batches, noise_seed=0).loss for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_only_lora_parameters_change(tmp_path: Path, patched: None) -> None:
    trainer = Trainer(tiny_config(tmp_path, "curriculum.stage1_steps=1", "curriculum.stage2_steps=0"))
    before = frozen_state(trainer)
    lora_before = {n: p.detach().clone() for n, p in lora_named_parameters(trainer.c.transformer)}
    for _ in range(3):  # one single-subject step, then same-category diptychs
        trainer.train_step(trainer.next_batches())
    after = frozen_state(trainer)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = {n for n, p in lora_named_parameters(trainer.c.transformer) if not torch.equal(p, lora_before[n])}
    trainable = {n for n, p in lora_named_parameters(trainer.c.transformer) if p.requires_grad}
    # Nothing frozen moved. Trainable weights all moved except the subject-branch B of the last
    # single block's to_q / proj_mlp / proj_out: condition rows leave that block unused, so their
    # gradient is exactly zero (and B starts at zero).
    assert changed <= trainable
    still = {n for n in trainable - changed}
    assert all(n.startswith("single_transformer_blocks.1.") and ".lora_B.subject." in n for n in still), still
    text_noise = [n for n, m in trainer.c.transformer.named_modules() if isinstance(m, BranchLoRALinear) and m.stream == "text"]
    assert text_noise and all(f"{n}.lora_B.noise.weight" not in trainable for n in text_noise)


def test_resume_continues_exactly(tmp_path: Path, straight: TrainResult) -> None:
    cfg = tiny_config(tmp_path, "checkpoint_every=3", "keep_last=2")
    first = train(cfg.__class__(**{**cfg.__dict__, "max_steps": 4}))
    assert first.state.step == 4 and [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    resumed = train(cfg, resume="latest")
    assert resumed.state.step == 10
    a, b = lora_of(straight.lora_path), lora_of(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = load_file(str(straight.checkpoint / "optimizer.safetensors"))
    opt_b = load_file(str(resumed.checkpoint / "optimizer.safetensors"))
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    # ...and so do the global RNG states (a DataLoader iterator created at the resume step used to
    # draw an extra seed from the torch RNG).
    rng_a, rng_b = lora_of(straight.checkpoint / "rng_rank0.safetensors"), lora_of(resumed.checkpoint / "rng_rank0.safetensors")
    assert rng_a.keys() == rng_b.keys() and all(torch.equal(rng_a[k], rng_b[k]) for k in rng_a)
    assert (straight.checkpoint / "rng_rank0.json").read_text() == (resumed.checkpoint / "rng_rank0.json").read_text()
    # The log of the resumed run reads like the uninterrupted one.
    assert [r["loss"] for r in read_metrics(tmp_path)] == [r["loss"] for r in read_metrics(straight.output_dir)]


def test_checkpoints_are_complete_pickle_free_and_pruned(straight: TrainResult) -> None:
    found = list_checkpoints(straight.output_dir)
    assert [s for s, _ in found] == [9, 10]  # saved at 3, 6, 9 and the end; keep_last 2
    names = {p.name for p in found[-1][1].iterdir()}
    assert {"lora.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "rng_rank0.json", "rng_rank0.safetensors", "trainer.json"} <= names
    assert all(n.endswith((".json", ".safetensors")) for n in names)
    assert not list((straight.output_dir / "checkpoints").glob(".tmp-*"))


def test_stages_follow_the_curriculum(straight: TrainResult) -> None:
    records = read_metrics(straight.output_dir)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["stage"] for r in records] == [1] * 4 + [2] * 3 + [3] * 3
    assert all(r["num_conditions"] == 1 and r["kind"] == "single" for r in records[:4])
    assert all(r["num_conditions"] == 2 and r["kind"] == "same_category" for r in records[7:])
    assert all(r["kind"] in ("single", "random_pair") for r in records[4:7])
    # warmup 2, transformers' ramp lr * u / warmup after u updates: the first update runs at lr 0
    assert [r["lr"] for r in records[:3]] == pytest.approx([0.0, 0.5e-3, 1e-3])


def test_saved_lora_loads_into_the_pipeline_and_generates(straight: TrainResult) -> None:
    from musar.pipelines.presets import load_pipeline

    assert (straight.output_dir / "validation" / "step_00000010.png").is_file()
    pipe = load_pipeline(preset="tiny", lora=straight.lora_path, device="cpu")
    assert pipe.transformer.lora_config.subject_rank == 8
    examples = Path(__file__).resolve().parents[1] / "examples"
    out = pipe(
        "a photo of a corgi and a red backpack", [(examples / "dog.jpg", "a corgi"), (examples / "backpack.jpg", "a red backpack")],
        height=64, width=64, num_inference_steps=2, condition_size=64, progress=False,
    )
    assert out.images[0].size == (64, 64)


def test_nonfinite_loss_is_skipped_and_counted(tmp_path: Path, patched: None, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(tiny_config(tmp_path, "max_steps=4", "checkpoint_every=0"))
    nan_after(trainer, monkeypatch, bad_calls={2})
    trainer.train_step(trainer.next_batches())
    params = {n: p.detach().clone() for n, p in lora_named_parameters(trainer.c.transformer)}
    adam_steps = [s["step"].clone() for s in trainer.c.optimizer.state.values()]
    result = trainer.train_step(trainer.next_batches())
    assert result.skipped and result.loss != result.loss
    assert all(torch.equal(p, params[n]) for n, p in lora_named_parameters(trainer.c.transformer))
    assert [s["step"] for s in trainer.c.optimizer.state.values()] == adam_steps
    done = trainer.fit()  # steps 3 and 4 are fine again
    assert (done.state.step, done.state.updates, done.state.nonfinite_total, done.state.nonfinite_in_a_row) == (4, 3, 1, 0)
    assert [(r["step"], r["nonfinite_total"]) for r in read_metrics(tmp_path)] == [(3, 1), (4, 1)]


def test_k_nonfinite_in_a_row_stop_and_keep_the_last_good_checkpoint(
    tmp_path: Path, patched: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(tiny_config(tmp_path, "checkpoint_every=1", "max_nonfinite_in_a_row=3"))
    nan_after(trainer, monkeypatch, start=3)
    with pytest.raises(TrainingStopped) as err:
        trainer.fit()
    message = str(err.value)
    assert "3 non-finite losses in a row (steps 3-5)" in message and "step_00000002" in message
    assert "\n" not in message
    assert [s for s, _ in list_checkpoints(tmp_path)][-1] == 2


def test_sigint_saves_a_checkpoint_then_resume(tmp_path: Path, patched: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path, "max_steps=4", "checkpoint_every=0")
    trainer = Trainer(cfg)
    real, calls = trainer.compute_loss, {"n": 0}

    def compute_loss(batch: Any, seed: int) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C arrived during step 2
        return real(batch, seed)

    monkeypatch.setattr(trainer, "compute_loss", compute_loss)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or `cmd &`, else Python's default
    with pytest.raises(TrainingInterrupted) as err:
        trainer.fit()
    assert err.value.checkpoint.name == "step_00000002" and err.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert train(cfg, resume="latest").state.step == 4


def test_existing_checkpoints_need_resume(straight: TrainResult) -> None:
    with pytest.raises(MusarError, match="--resume latest"):
        Trainer(tiny_config(straight.output_dir))
    with pytest.raises(MusarError, match="not a checkpoint folder"):
        Trainer(tiny_config(straight.output_dir), resume=straight.output_dir)


@pytest.mark.gpu
def test_gpu_training_step_with_the_chosen_attention_kernels(tmp_path: Path, patched: None) -> None:
    import torch.nn.functional as F

    from musar.train.kernels import sdpa_context

    device = torch.device("cuda")
    # FLUX-sized attention (24 heads x 128, c = 2 sequence) forward + backward under the kernels
    # training uses; SDPA's default cuDNN kernel failed exactly here (docs/design.md sec. 9).
    q, k, v = (torch.randn(1, 24, 6720, 128, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with sdpa_context("flash_efficient", device):
        F.scaled_dot_product_attention(q, k, v).float().square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the CPU tests of this process initialised accelerate for CPU
    trainer = Trainer(tiny_config(tmp_path, "curriculum.stage1_steps=0", "curriculum.stage2_steps=0", "model.device=auto"))
    assert trainer.acc.device.type == "cuda" and trainer.acc.mixed_precision == "bf16"
    before = {n: p.detach().clone() for n, p in lora_named_parameters(trainer.c.transformer) if p.requires_grad}
    result = trainer.train_step(trainer.next_batches())
    assert not result.skipped and result.num_conditions == 2
    assert any(not torch.equal(p, before[n]) for n, p in lora_named_parameters(trainer.c.transformer) if n in before)
    AcceleratorState._reset_state(True)
