"""Training checkpoints: one folder per step, written under a temporary name and renamed.

Layout of ``<output_dir>/checkpoints/step_00001000/``::

    lora.safetensors         the LoRA, in exactly the format MusarPipeline.load_lora reads
    optimizer.safetensors    AdamW state tensors (key "<param index>.<name>")
    optimizer.json           the rest of the optimizer state (param groups, hyper-parameters)
    scheduler.json           LR scheduler state
    rng_rank<r>.json         python + numpy RNG states of rank r
    rng_rank<r>.safetensors  torch CPU (and CUDA) RNG states of rank r
    trainer.json             step, counters, data stream position, config summary (written last)

Nothing here is a pickle: tensors go to safetensors, everything else to JSON, so loading a
checkpoint cannot execute code. (Under FSDP every rank saves its own optimizer shard as
``optimizer_rank<r>.*``; under DeepSpeed the partitioned state is saved by DeepSpeed itself into
``optimizer_backend/``; see musar.train.distributed.)

A folder is complete once it carries its final name: it is assembled as ``.tmp-step_...`` and
moved into place with one ``os.replace``; ``latest`` is the highest complete step.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from musar.errors import MusarError
from musar.utils.io import atomic_write_json

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})$")
TRAINER_FILE = "trainer.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_root(output_dir: str | os.PathLike[str]) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a folder without trainer.json was never finished)."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / TRAINER_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: str | os.PathLike[str], spec: str) -> Path:
    """``latest`` -> the newest checkpoint of ``output_dir``; otherwise a checkpoint folder path."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise MusarError(f"--resume latest: no checkpoint in {checkpoints_root(output_dir)}")
        return found[-1][1]
    path = Path(spec)
    if not (path / TRAINER_FILE).is_file():
        raise MusarError(f"--resume {spec}: not a checkpoint folder (no {TRAINER_FILE} in it)")
    return path


def staging_dir(output_dir: str | os.PathLike[str], step: int) -> Path:
    return checkpoints_root(output_dir) / f".tmp-{checkpoint_name(step)}"


def commit(staging: Path, final: Path) -> Path:
    """Move a finished staging folder onto its final name (replacing an older one atomically)."""
    old = None
    if final.exists():
        # os.replace cannot replace a non-empty folder; move the old one aside first so the
        # final name is never missing for longer than two renames.
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune(output_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (0 keeps everything)."""
    found = list_checkpoints(output_dir)
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    doomed = [path for _, path in found[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MusarError(f"cannot read checkpoint file {path}: {e}") from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


# -- optimizer state -----------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return {"__tuple__": [_jsonable(x) for x in v]}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def _from_json(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"__tuple__"}:
            return tuple(_from_json(x) for x in v["__tuple__"])
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer ``state_dict`` -> (tensors for safetensors, the rest for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                # One copy, always: gathered (FSDP) states can be views of one buffer, which
                # safetensors refuses, and a CPU state must not alias the live optimizer.
                tensors[f"{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {"param_groups": _jsonable(state["param_groups"]), "scalars": scalars,
            "index_type": "int" if all(isinstance(i, int) for i in state["state"]) else "str"}
    return tensors, meta


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_optimizer_state`."""
    cast = int if meta.get("index_type", "int") == "int" else str
    state: dict[Any, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.rpartition(".")
        state.setdefault(cast(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(cast(index), {}).update(values)
    return {"state": state, "param_groups": _from_json(meta["param_groups"])}


def save_optimizer(state: dict[str, Any], directory: Path, name: str = "optimizer") -> None:
    tensors, meta = split_optimizer_state(state)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    write_json(directory / f"{name}.json", meta)


def load_optimizer(directory: Path, name: str = "optimizer") -> dict[str, Any]:
    path = directory / f"{name}.safetensors"
    if not path.is_file():
        raise MusarError(f"checkpoint {directory} has no optimizer state {path.name} (saved by another number of processes?)")
    return join_optimizer_state(load_file(str(path)), read_json(directory / f"{name}.json"))


# -- RNG state -----------------------------------------------------------------------------------


def save_rng(directory: Path, rank: int) -> None:
    """Python, numpy, torch CPU and CUDA generator states of this process."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    write_json(directory / f"rng_rank{rank}.json", {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    })
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    save_file(tensors, str(directory / f"rng_rank{rank}.safetensors"))


def load_rng(directory: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for this rank."""
    meta_path, tensor_path = directory / f"rng_rank{rank}.json", directory / f"rng_rank{rank}.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        return False
    meta = read_json(meta_path)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(tensor_path))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return True
