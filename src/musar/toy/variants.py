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
import time
from dataclasses import dataclass
from pathlib import Path

from musar.errors import MusarError
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
        overrides += [f"checkpoint_every={cfg.curriculum.stage1_steps}", "keep_last=0"]
    return overrides


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

    A finished run (its ``lora.safetensors`` exists) is reused unless ``force``; ``wall.json``
    records how long the training took.
    """
    import shutil

    import musar.toy.codec  # noqa: F401  (diffusers resolves the toy codec class from sys.modules)
    from musar.train import load_config, train

    variant = get_variant(name)
    folder = variant_dir(out, name)
    lora = folder / "lora.safetensors"
    if lora.is_file() and not force:
        log(f"toy train {name}: reusing {lora}")  # type: ignore[operator]
        return lora
    if folder.exists():
        shutil.rmtree(folder)
    overrides = variant_overrides(variant, out, config, extra)
    cfg = load_config(config, overrides)
    log(f"toy train {name}: musar train --config {config} " + " ".join(f"--set {o}" for o in overrides))  # type: ignore[operator]
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    atomic_write_json(folder / "wall.json", {"variant": name, "wall_s": round(wall, 1), "steps": cfg.total_steps,
                                             "stage1_steps": cfg.curriculum.stage1_steps, "overrides": overrides})
    return Path(result.lora_path)
