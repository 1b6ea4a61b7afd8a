"""The toy chain's stages as plain functions, shared by ``musar toy`` and :mod:`musar.toy.chain`."""

from __future__ import annotations

from pathlib import Path


def pretrain(out: Path, config: str | None, overrides: list[str], threads: int | None, force: bool = False) -> None:
    from musar.toy.pretrain import load_pretrain_config, pretrain

    extra = [f"threads={threads}"] if threads else []
    pretrain(load_pretrain_config(config, [*overrides, *extra]), out, force=force)


def data(out: Path, pairs: int) -> Path:
    from musar.toy.world import write_pairs_parquet

    out.mkdir(parents=True, exist_ok=True)
    # Brief naming: the subject's look must come from the other view (see musar.toy.cases).
    return write_pairs_parquet(pairs, out / "pairs.parquet", seed=1, size=64, brief=True)


def train_extra(overrides: list[str], threads: int | None) -> tuple[str, ...]:
    return (*overrides, *([f"model.cpu_threads={threads}"] if threads else []))


def ship(out: Path) -> Path:
    """Copy ``out/base`` and the full variant's LoRA into the package's assets (a few MB)."""
    import shutil

    from musar.errors import MusarError
    from musar.toy.model import ASSETS, SHIPPED_BASE, SHIPPED_LORA
    from musar.toy.variants import variant_dir
    from musar.utils.io import atomic_folder, atomic_write

    lora = variant_dir(out, "full") / "lora.safetensors"
    if not (out / "base" / "model_index.json").is_file() or not lora.is_file():
        raise MusarError(f"nothing to ship: need {out / 'base'} and {lora} (run musar toy all first)")
    ASSETS.mkdir(parents=True, exist_ok=True)

    def build(staging: Path) -> None:
        shutil.copytree(out / "base", staging)
        _halve(staging / "transformer" / "diffusion_pytorch_model.safetensors")

    # Built beside the shipped base and swapped in by renames: never half a base.
    atomic_folder(SHIPPED_BASE, build)
    atomic_write(SHIPPED_LORA, lambda tmp: shutil.copyfile(lora, tmp))
    return ASSETS


def _halve(path: Path) -> None:
    """Store the base transformer in fp16 (16 -> 8 MB); ``from_pretrained(torch_dtype=float32)``
    upcasts it on load. The LoRA stays fp32 (3 MB)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(path), metadata=meta)
