"""The MUSAR variants of the paper's Fig. 8 ablation, as overrides of configs/toy_musar.yaml.

Each variant changes the *training* config and, where the paper's switch is an inference-time one
too (routing), the generation settings, so a variant is measured the way it was trained.

* ``full``: dual-branch LoRA, static + dynamic routing, 3-stage curriculum.
* ``no_dynamic``: dynamic routing off in training and generation (static routing stays).
* ``no_debias``: the debiasing off: no static routing (every token sees every token) and one
  ``shared`` LoRA on every row instead of the dual branch. Dynamic routing stays on.
* ``no_diptych``: single-subject data only: the whole step budget in curriculum stage 1.
* ``full_seed1``, ``full_seed2``: ``full`` trained from other seeds (``seed=1``, ``seed=2``) on the
  same base, so the table gives every ``full`` row as a mean and spread over three runs
  (:data:`FAMILIES`) and a gate on it holds only if it holds in every seed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from musar.errors import MusarError
from musar.utils import run_lock
from musar.utils.io import atomic_write_json

DEFAULT_CONFIG = "configs/toy_musar.yaml"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: tuple[str, ...]
    static_routing: bool = True
    dynamic_routing: bool = True
    stage1_only: bool = False
    keep_stage1: bool = False  # also keep the LoRA as it was at the end of curriculum stage 1 (gate 2)
    family: str = ""  # the variant this one repeats from another training seed ("" = itself)

    @property
    def family_name(self) -> str:
        return self.family or self.name


# Training order (``musar toy all`` trains them two at a time): what the headline claims need first.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("full", "MUSAR (full)", (), keep_stage1=True),
        Variant("no_dynamic", "w/o dynamic routing", ("routing.dynamic=false",), dynamic_routing=False),
        *(Variant(f"full_seed{k}", f"MUSAR (full), training seed {k}", (f"seed={k}",), keep_stage1=True, family="full")
          for k in (1, 2)),
        Variant("no_debias", "w/o debiasing (no static routing, shared LoRA)",
                ("routing.static=false", "lora.mode=shared"), static_routing=False),
        Variant("no_diptych", "w/o diptych data (stage 1 only)", (), stage1_only=True),
    )
}
# Each variant and its repeats from other training seeds, in training order.
FAMILIES: dict[str, tuple[str, ...]] = {
    name: tuple(v.name for v in VARIANTS.values() if v.family_name == name)
    for name in dict.fromkeys(v.family_name for v in VARIANTS.values())
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise MusarError(f"unknown toy variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def variant_dir(out: str | Path, name: str) -> Path:
    return Path(out) / "musar" / name


def trained_members(out: str | Path, family: str) -> list[str]:
    """The variants of ``family`` (itself and its seed repeats) whose LoRA exists under ``out``."""
    return [n for n in FAMILIES.get(family, (family,)) if (variant_dir(out, n) / "lora.safetensors").is_file()]


def variant_overrides(
    variant: Variant, out: str | Path, config: str | Path = DEFAULT_CONFIG, extra: tuple[str, ...] = ()
) -> list[str]:
    """The ``--set`` overrides that turn ``config`` into this variant's run under ``out``."""
    from musar.train.config import load_config

    overrides = [
        f"output_dir={variant_dir(out, variant.name)}",
        f"model.pretrained={Path(out) / 'base'}",
        f"data.source={Path(out) / 'pairs.parquet'}",
        *variant.overrides,
        *extra,
    ]
    cfg = load_config(config, overrides)
    if variant.stage1_only:  # same total budget, all of it single-subject
        total = cfg.curriculum.total_steps
        overrides += [f"curriculum.stage1_steps={total}", "curriculum.stage2_steps=0", "curriculum.stage3_steps=0"]
    if variant.keep_stage1:  # a checkpoint lands exactly at the end of stage 1 and is kept
        every = math.gcd(cfg.checkpoint_every, cfg.curriculum.stage1_steps) if cfg.checkpoint_every else cfg.curriculum.stage1_steps
        overrides += [f"checkpoint_every={every}", "keep_last=0"]
    return overrides


def _kept_steps(folder: Path) -> set[int]:
    wall = folder / "wall.json"
    stage1 = json.loads(wall.read_text()).get("stage1_steps") if wall.is_file() else None
    return {stage1} if stage1 is not None else set()


def drop_resume_checkpoints(folder: Path, variant: Variant) -> None:
    """Once a variant's LoRA exists, its checkpoints only served resuming: delete them, except the
    end of stage 1 that gate 2 reads (:func:`stage1_lora`)."""
    import shutil

    from musar.train.checkpoint import list_checkpoints

    keep = _kept_steps(folder) if variant.keep_stage1 else set()
    for step, path in list_checkpoints(folder):
        if step not in keep:
            shutil.rmtree(path)


def stage1_lora(out: str | Path, name: str) -> Path:
    """The variant's LoRA checkpoint at the end of curriculum stage 1."""
    from musar.train.checkpoint import list_checkpoints

    folder = variant_dir(out, name)
    wall = folder / "wall.json"
    stage1 = None
    if wall.is_file():
        stage1 = json.loads(wall.read_text()).get("stage1_steps")
    for step, path in list_checkpoints(folder):
        if step == stage1:
            return path / "lora.safetensors"
    raise MusarError(f"no stage-1 checkpoint of {name} under {folder} (train it with this version of musar toy)")


def train_variant(
    name: str, out: str | Path, config: str | Path = DEFAULT_CONFIG, extra: tuple[str, ...] = (), force: bool = False,
    log: object = print,
) -> Path:
    """Train one variant with ``musar.train`` (unchanged) and return its LoRA path.

    A finished run (its ``lora.safetensors`` exists) is reused unless ``force``. An unfinished one
    (stopped by a signal, which saves a checkpoint, or killed after its latest periodic
    checkpoint, ``checkpoint_every``) resumes from its newest valid checkpoint, bit-exactly as if
    it had not stopped; a changed config refuses the resume (:mod:`musar.train.fingerprint`) and
    ``force`` starts over. ``wall.json`` records the training wall summed over the calls that
    made the LoRA (a call killed without a signal is not counted).
    """
    import musar.toy.codec  # noqa: F401  (diffusers resolves the toy codec class from sys.modules)
    from musar.train import load_config, train
    from musar.train.checkpoint import list_checkpoints, plan_resume

    variant = get_variant(name)
    folder = variant_dir(out, name)
    lora = folder / "lora.safetensors"
    if lora.is_file() and not force:
        log(f"toy train {name}: reusing {lora}")  # type: ignore[operator]
        return lora
    overrides = variant_overrides(variant, out, config, extra)
    cfg = load_config(config, overrides)
    # The whole decision (reuse, resume or clear) under the folder's lock: a second `musar toy
    # train` of the same variant fails at once instead of clearing the folder under the first.
    with run_lock.hold(folder, "toy variant training"):
        if force or not list_checkpoints(folder):
            _clear(folder)
        resume = None
        if list_checkpoints(folder):
            try:
                resume = plan_resume(folder, "latest", cfg.total_steps, cfg)
            except MusarError as e:
                raise MusarError(f"toy train {name}: cannot resume {folder}: {e} (or pass --force to start it over)") from None
            for line in resume.describe():
                log(f"toy train {name}: {line}")  # type: ignore[operator]
        log(f"toy train {name}: musar train --config {config} " + " ".join(f"--set {o}" for o in overrides))  # type: ignore[operator]
        parts_file = folder / "wall_parts.json"
        parts: list[float] = json.loads(parts_file.read_text()) if resume is not None and parts_file.is_file() else []
        t0 = time.perf_counter()
        try:
            result = train(cfg, resume=resume)
        finally:  # an interrupted call still counts the time it spent
            parts.append(round(time.perf_counter() - t0, 1))
            atomic_write_json(parts_file, parts)
        atomic_write_json(folder / "wall.json", {"variant": name, "wall_s": round(sum(parts), 1), "calls": len(parts),
                                                 "resumed_from_step": resume.step if resume is not None else 0,
                                                 "steps": cfg.total_steps, "stage1_steps": cfg.curriculum.stage1_steps,
                                                 "overrides": overrides})
        drop_resume_checkpoints(folder, variant)
    return Path(result.lora_path)


def _clear(folder: Path) -> None:
    """Empty ``folder`` for a fresh run, keeping its lock file (a lock file is never deleted:
    :mod:`musar.utils.run_lock`)."""
    import shutil

    keep = run_lock.lock_path(folder).name
    for entry in folder.iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
