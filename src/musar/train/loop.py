"""The training loop: dual-branch LoRA on the curriculum, on accelerate, with exact resume.

One *step* consumes ``grad_accumulation`` batches per process and ends in at most one optimizer
update. The step counter drives the curriculum (the data stream's position is always
``step * grad_accumulation``), the noise seeds and the schedule of checkpoints, logs and
validation grids. A step whose loss (on any process) or gradient norm is not finite is *skipped*:
gradients are dropped, no optimizer or scheduler update happens, the step still counts (its data
is consumed) and so does the failure; ``max_nonfinite_in_a_row`` of them in a row stop the run,
leaving the newest checkpoint as the last good one (none is written during such a streak).

Every random draw of a step (VAE posterior sample, timesteps, noise) comes from a generator
seeded with ``(seed, rank, step, micro-batch)``, so a resumed run reproduces an uninterrupted one
exactly; global RNG states are checkpointed as well, for anything else that draws from them.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musar.data import Batch
from musar.errors import MusarError
from musar.train import checkpoint as ckpt
from musar.train.config import TrainConfig, dump_config
from musar.train.distributed import any_across, is_deepspeed, is_fsdp, mean_across
from musar.train.encoding import encode_batch
from musar.train.fingerprint import is_main_launch_process
from musar.train.kernels import sdpa_context
from musar.train.objective import draw_noise, flow_step_loss
from musar.train.setup import Components, build_components
from musar.train.state import load_training_state, save_training_state
from musar.train.tracking import Tracker, truncate_metrics
from musar.train.validation import check_validation, render_validation, write_grid
from musar.utils import run_lock
from musar.utils.io import atomic_write, atomic_write_text


class TrainingStopped(MusarError):
    """Too many non-finite losses in a row; the message names the last good checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM: a checkpoint was saved, the run can be resumed."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


@dataclass
class TrainState:
    step: int = 0  # steps done (applied or skipped)
    updates: int = 0  # optimizer updates applied
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    span_fallbacks: int = 0  # diptych batches whose phrases could not be located (routing off)


@dataclass
class StepResult:
    loss: float  # mean loss of the step's batches (NaN when skipped)
    skipped: bool
    grad_norm: float | None
    lr: float  # learning rate of this step's update
    stage: int
    kind: str
    num_conditions: int


@dataclass
class TrainResult:
    output_dir: Path
    state: TrainState
    lora_path: Path | None
    checkpoint: Path | None
    losses: list[float] = field(default_factory=list)
    main_process: bool = True  # False on the other ranks of a multi-process run
    start_step: int = 0  # the step it resumed from; state.step - start_step steps were trained


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a request to checkpoint and exit; a second SIGINT aborts.

    ``name`` is the command the notice names (the toy pretraining uses it too)."""

    def __init__(self, name: str = "musar train") -> None:
        self.name = name
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{self.name}: {signal.Signals(signum).name} received; saving a checkpoint after this step "
              "(Ctrl-C again to abort without saving)", file=sys.stderr)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, np.uint64)[0] >> 1)


class Trainer:
    """Owns the models, optimizer, data and state of one run. ``fit()`` runs it."""

    def __init__(self, cfg: TrainConfig, resume: str | Path | ckpt.ResumePoint | None = None) -> None:
        self.cfg = cfg.check()
        self.output_dir = Path(cfg.output_dir)
        # One run per output folder: a second one would overwrite this one's checkpoints, LoRA and
        # metrics. Only the main process locks; the launcher ends the other ranks if it fails.
        main = is_main_launch_process()
        self._lock = run_lock.acquire(self.output_dir, "training run") if main else None
        try:
            self._start(cfg, resume, main)
        except BaseException:
            self.release()
            raise

    def _start(self, cfg: TrainConfig, resume: str | Path | ckpt.ResumePoint | None, main: bool) -> None:
        # Every file of the checkpoint is validated and its config compared with this one here,
        # before any model loads and before anything in the output folder is rewritten.
        point = ckpt.plan_resume(self.output_dir, resume, cfg.total_steps, cfg)
        resume_dir = point.path if point is not None else None
        if point is not None and main:
            for line in point.describe():
                print(f"musar train: {line}", file=sys.stderr)
        if cfg.validate_every:
            check_validation(cfg.validation)
        self.c: Components = build_components(cfg, resume_dir)
        self.acc = self.c.accelerator
        self.state = TrainState()
        if resume_dir is not None:
            self._load(resume_dir)
        self.start_step = self.state.step
        self.c.stream.position = self.state.step * cfg.optim.grad_accumulation
        self._batches: Iterator[Batch] | None = None
        self.last_checkpoint: Path | None = resume_dir
        self.tracker: Tracker | None = None
        self._warned_spans = False

    def release(self) -> None:
        """Let go of the output folder's lock (fit() does this when it ends)."""
        if self._lock is not None:
            self._lock.release()

    # -- one step --------------------------------------------------------------------------------

    def compute_loss(self, batch: Batch, seed: int) -> torch.Tensor:
        """Encode ``batch`` and return the flow-matching loss; every random draw comes from ``seed``."""
        c = self.c
        gen = torch.Generator(device=self.acc.device).manual_seed(seed)
        enc = encode_batch(
            c.pipe, batch.to(self.acc.device, dtype=c.pipe.vae.dtype),
            max_sequence_length=self.cfg.data.max_sequence_length, phrase_tokens=self.cfg.data.phrase_tokens,
            condition_timestep=self.cfg.model.condition_timestep, generator=gen, cache=c.text_cache,
            dtype=c.compute_dtype,
        )
        if not enc.spans_found:
            self.state.span_fallbacks += 1
            if not self._warned_spans:
                warnings.warn(f"subject phrases not found in a prompt ({batch.prompts[0]!r}); dynamic routing is "
                              "off for such batches (counted as span_fallbacks)", stacklevel=2)
                self._warned_spans = True
        t, eps = draw_noise(enc, self.cfg.objective, gen)
        guidance = self.cfg.objective.guidance if c.transformer.config.guidance_embeds else None
        # Only the transformer runs under the restricted SDPA kernels: the VAE's attention has
        # 512-dim heads, which FlashAttention does not take.
        with sdpa_context(self.cfg.model.attention, self.acc.device):
            return flow_step_loss(c.model, enc, t, eps, guidance=guidance, routing=self.cfg.routing)

    def train_step(self, batches: list[Batch], noise_seed: int | None = None) -> StepResult:
        """Forward/backward over ``batches`` and at most one optimizer update."""
        c, acc, n = self.c, self.acc, len(batches)
        c.model.train()
        lr = float(c.scheduler.get_last_lr()[0])
        losses: list[float] = []
        skipped, grad_norm = False, None
        for i, batch in enumerate(batches):
            seed = noise_seed if noise_seed is not None else step_seed(self.cfg.seed, acc.process_index, self.state.step, i)
            loss = self.compute_loss(batch, seed)
            # Decided together: a rank that skipped backward alone would hang DDP's all-reduce.
            (bad,) = any_across(acc, not bool(torch.isfinite(loss.detach())))
            if bad:
                skipped = True
                break
            sync = contextlib.nullcontext() if i == n - 1 else acc.no_sync(c.model)
            # The backward recomputes checkpointed blocks: same kernels as their forward.
            with sync, sdpa_context(self.cfg.model.attention, acc.device):
                acc.backward(loss / n)
            losses.append(float(loss.detach()))
        if not skipped:
            max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else float("inf")
            norm = acc.clip_grad_norm_(c.params, max_norm)
            grad_norm = None if norm is None else float(norm)
            # DeepSpeed has already stepped inside backward (and handles overflow itself).
            skipped = grad_norm is not None and not np.isfinite(grad_norm) and not is_deepspeed(acc)
        if skipped:
            c.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_total += 1
            self.state.nonfinite_in_a_row += 1
        else:
            c.optimizer.step()
            c.scheduler.step()
            c.optimizer.zero_grad(set_to_none=True)
            self.state.updates += 1
            self.state.nonfinite_in_a_row = 0
        self.state.step += 1
        meta = batches[0].meta[0] if batches[0].meta else {}
        return StepResult(
            loss=float(np.mean(losses)) if losses and not skipped else float("nan"), skipped=skipped,
            grad_norm=grad_norm, lr=lr, stage=int(meta.get("stage", 0)), kind=str(meta.get("batch_kind", "")),
            num_conditions=batches[0].num_conditions,
        )

    def next_batches(self) -> list[Batch]:
        if self._batches is None:
            # Creating a DataLoader iterator draws its base seed from the global torch RNG; a
            # resumed run creates it at another step than an uninterrupted one, so the draw would
            # make their checkpointed RNG states differ. Our data order never uses that seed.
            with torch.random.fork_rng(devices=[]):
                self._batches = iter(self.c.loader)
        batches = [next(self._batches) for _ in range(self.cfg.optim.grad_accumulation)]
        expected = (self.state.step + 1) * self.cfg.optim.grad_accumulation
        if batches[-1].next_position not in (None, expected):  # the resume guarantee, checked every step
            raise RuntimeError(f"data stream out of step: got batch {batches[-1].next_position - 1}, expected {expected - 1}")
        return batches

    # -- the run ---------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, acc, total = self.cfg, self.acc, self.cfg.total_steps
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.output_dir, self.state.step)
            atomic_write_text(self.output_dir / "config.yaml", dump_config(cfg))
        self.tracker = Tracker(self.output_dir, acc, cfg.report_to)
        losses: list[float] = []
        window: list[float] = []
        bar = tqdm(total=total, initial=min(self.state.step, total), desc="train", disable=not acc.is_main_process,
                   dynamic_ncols=True)
        started, started_step = time.perf_counter(), self.state.step
        try:
            with StopSignals() as stop:
                while self.state.step < total:
                    result = self.train_step(self.next_batches())
                    step = self.state.step
                    loss = mean_across(acc, result.loss)
                    losses.append(loss)
                    if not result.skipped:
                        window.append(loss)
                    rate = (step - started_step) / max(time.perf_counter() - started, 1e-9)
                    lr = result.lr
                    self._record(step, result, loss, lr, rate, window)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", steps_per_s=f"{rate:.2f}", refresh=False)
                    if cfg.validate_every and step % cfg.validate_every == 0:
                        self.validate()
                    if stop.signum is not None:  # a signal on any rank stops every rank at this step
                        acc.set_trigger()
                    stop_requested = acc.check_trigger()
                    if self.state.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                        raise TrainingStopped(self._stop_message())
                    if stop_requested:
                        path = self.save_checkpoint()
                        raise TrainingInterrupted(stop.signum or signal.SIGTERM, path)
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and self.state.nonfinite_in_a_row == 0:
                        self.save_checkpoint()
            if self.last_checkpoint is None or _step_of(self.last_checkpoint) != self.state.step:
                self.save_checkpoint()
            lora = self.output_dir / "lora.safetensors"
            if acc.is_main_process and self.last_checkpoint is not None:
                atomic_write(lora, lambda tmp: tmp.write_bytes((self.last_checkpoint / "lora.safetensors").read_bytes()))
            acc.wait_for_everyone()
            return TrainResult(self.output_dir, self.state, lora, self.last_checkpoint, losses, acc.is_main_process,
                               self.start_step)
        finally:
            bar.close()
            self.tracker.close()
            self.release()

    def _record(self, step: int, result: StepResult, loss: float, lr: float, rate: float, window: list[float]) -> None:
        assert self.tracker is not None
        self.tracker.record({"step": step, "loss": loss, "lr": lr, "skipped": result.skipped, "stage": result.stage,
                             "kind": result.kind, "num_conditions": result.num_conditions, "grad_norm": result.grad_norm,
                             "nonfinite_total": self.state.nonfinite_total})
        if step % self.cfg.log_every == 0:
            scalars = {"train/lr": lr, "train/steps_per_s": rate, "train/stage": float(result.stage),
                       "train/nonfinite_total": float(self.state.nonfinite_total)}
            if window:
                scalars["train/loss"] = float(np.mean(window))
            if result.grad_norm is not None:
                scalars["train/grad_norm"] = result.grad_norm
            self.tracker.scalars(step, scalars)
            window.clear()

    def _stop_message(self) -> str:
        k, step = self.state.nonfinite_in_a_row, self.state.step
        good = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
        return (f"stopped at step {step}: {k} non-finite losses in a row (steps {step - k + 1}-{step}); {good}. "
                "Lower optim.lr or check the data, then resume with --resume latest")

    def validate(self) -> Path | None:
        """Render the validation grid with the current LoRA (main process)."""
        if is_fsdp(self.acc):  # FSDP units cannot run outside the wrapped root (see distributed.py)
            warnings.warn("validation grids are not rendered under FSDP; render checkpoints with musar generate", stacklevel=2)
            return None
        path = None
        if self.acc.is_main_process:
            try:
                with self.acc.autocast():
                    grid = render_validation(self.c.pipe, self.cfg.validation, self.cfg.data.condition_size, self.acc.device)
                path = write_grid(grid, self.output_dir / "validation", self.state.step, self.cfg.validation)
                if self.tracker is not None:
                    self.tracker.image("validation", grid, self.state.step)
            except (RuntimeError, OSError, ValueError) as e:
                # Observability must not end a long run (nor leave the other ranks waiting below).
                warnings.warn(f"validation at step {self.state.step} failed, training goes on: {e}", stacklevel=2)
        self.acc.wait_for_everyone()
        return path

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        path = save_training_state(self.c, self.cfg, asdict(self.state), self.output_dir, self.state.step)
        self.last_checkpoint = path
        return path

    def _load(self, directory: Path) -> None:
        try:
            raw = load_training_state(self.c, self.cfg, directory)
        except (ValueError, KeyError, RuntimeError) as e:  # valid files that do not fit this run's config
            if isinstance(e, MusarError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MusarError(f"checkpoint {directory} does not fit this config: {first}") from None
        self.state = TrainState(**{k: raw[k] for k in asdict(TrainState()) if k in raw})


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])


def train(cfg: TrainConfig, resume: str | Path | ckpt.ResumePoint | None = None) -> TrainResult:
    """Build a :class:`Trainer` and run it to ``cfg.total_steps``.

    ``resume``: ``"latest"`` (the newest valid checkpoint of ``cfg.output_dir``), a checkpoint
    folder, or a :class:`~musar.train.checkpoint.ResumePoint` from
    :func:`~musar.train.checkpoint.plan_resume` (already validated).
    """
    return Trainer(cfg, resume=resume).fit()
