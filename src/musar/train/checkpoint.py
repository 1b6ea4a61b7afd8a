"""Training checkpoints: one folder per step, written under a temporary name and renamed.

Layout of ``<output_dir>/checkpoints/step_00001000/``::

    lora.safetensors         the LoRA, in exactly the format MusarPipeline.load_lora reads
    optimizer.safetensors    AdamW state tensors (key "<param index>.<name>")
    optimizer.json           the rest of the optimizer state (param groups, hyper-parameters)
    scheduler.json           LR scheduler state
    rng_rank<r>.json         python + numpy RNG states of rank r
    rng_rank<r>.safetensors  torch CPU (and CUDA) RNG states of rank r
    trainer.json             step, counters, data stream position, the run's config (musar.train.fingerprint)
    manifest.json            size and sha256 of every other file (written last, by commit)

Nothing here is a pickle: tensors go to safetensors, everything else to JSON, so loading a
checkpoint cannot execute code. (Under FSDP every rank saves its own optimizer shard as
``optimizer_rank<r>.*``; under DeepSpeed the partitioned state is saved by DeepSpeed itself into
``optimizer_backend/``; see musar.train.distributed.)

A folder is complete once it carries its final name: it is assembled as ``.tmp-step_...``, every
file is given the common file mode and fsync'd, the manifest is written, and the folder is moved
into place with one ``os.replace`` (then its parent is fsync'd).

Resuming validates every file first (:func:`validate_checkpoint`: the manifest's sizes and hashes,
each JSON file parsed, each safetensors header complete, every file the loader needs present),
so a damaged checkpoint is one readable line, never a traceback from deep inside a loader.
``--resume latest`` (:func:`find_resume`) takes the newest *valid* checkpoint and says which
damaged ones it passed over. A checkpoint's JSON is read defensively (musar.utils.safe_load), so a
hostile file (deeply nested, huge, not UTF-8) is one more damaged checkpoint to pass over, never
a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from musar.errors import MusarError
from musar.train.config import TrainConfig
from musar.train.fingerprint import RUN_CONFIG, check_resume_config
from musar.utils import safe_load
from musar.utils.io import atomic_write_json, file_sha256, finish_file, fsync_dir
from musar.utils.tensorfile import read_header
from musar.utils.validation import LORA_FORMAT

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})$")
TRAINER_FILE = "trainer.json"
MANIFEST_FILE = "manifest.json"


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


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from, its trainer state, and the damaged ones passed over."""

    path: Path
    state: dict[str, Any]
    skipped: tuple[str, ...] = ()  # one line each: "step_00000010 (optimizer.safetensors is truncated: ...)"

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def describe(self, resuming: bool = True) -> list[str]:
        """What a resume tells the user: each damaged checkpoint passed over, then where it starts."""
        lines = [f"skipping damaged checkpoint {skipped}" for skipped in self.skipped]
        newest = ", the newest valid checkpoint" if self.skipped else ""
        if resuming:
            lines.append(f"resuming from {self.path.name}{newest} (step {self.step})")
        if RUN_CONFIG not in self.state:
            lines.append(f"warning: {self.path.name} predates run config records; its config cannot be compared")
        return lines


def find_resume(output_dir: str | os.PathLike[str], spec: str) -> ResumePoint:
    """``latest`` -> the newest *valid* checkpoint of ``output_dir``; otherwise the checkpoint
    folder ``spec``, which must be valid itself (no fallback from a folder the user named)."""
    if spec != "latest":
        path = Path(spec)
        if not (path / TRAINER_FILE).is_file():
            raise MusarError(f"--resume {spec}: not a checkpoint folder (no {TRAINER_FILE} in it)")
        return ResumePoint(path, validate_checkpoint(path))
    found = list_checkpoints(output_dir)
    if not found:
        raise MusarError(f"--resume latest: no checkpoint in {checkpoints_root(output_dir)}")
    skipped: list[str] = []
    for _, path in reversed(found):
        try:
            return ResumePoint(path, validate_checkpoint(path), tuple(skipped))
        except MusarError as e:
            skipped.append(f"{path.name} ({_reason(e, path)})")
    raise MusarError(f"--resume latest: no valid checkpoint in {checkpoints_root(output_dir)}; "
                     f"{len(skipped)} damaged, the newest: {skipped[0]}")


def plan_resume(
    output_dir: str | os.PathLike[str], resume: str | os.PathLike[str] | ResumePoint | None, total_steps: int,
    cfg: TrainConfig | None = None,
) -> ResumePoint | None:
    """Where a run starts, decided before anything heavy loads: ``None`` (a fresh run) or a
    validated :class:`ResumePoint`. Refuses a fresh run over existing checkpoints, a resume
    already past ``total_steps`` and, given ``cfg``, a resume whose config differs from the
    checkpoint's (musar.train.fingerprint). A ResumePoint passed in is not validated again."""
    if resume is None:
        if list_checkpoints(output_dir):
            raise MusarError(f"{output_dir} already holds checkpoints; pass --resume latest to continue "
                             "or choose another --output-dir")
        return None
    point = resume if isinstance(resume, ResumePoint) else find_resume(output_dir, str(resume))
    if cfg is not None:
        check_resume_config(point.state, cfg, point.path)
    if point.step > total_steps:
        raise MusarError(f"{point.path} is at step {point.step}, past max_steps {total_steps}: raise --max-steps "
                         f"above {point.step} to continue this run, or choose another --output-dir")
    return point


# -- validation ----------------------------------------------------------------------------------


class DamagedCheckpoint(MusarError):
    """A checkpoint file is missing, truncated, unreadable or not what its manifest recorded."""


def _reason(error: MusarError, path: Path) -> str:
    return str(error).removeprefix(f"checkpoint {path} is damaged: ")


def _damaged(directory: Path, what: str) -> DamagedCheckpoint:
    return DamagedCheckpoint(f"checkpoint {directory} is damaged: {what}")


def _json_object(directory: Path, name: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    path = directory / name
    if not path.is_file():
        raise _damaged(directory, f"{name} is missing")
    try:
        value = safe_load.read_json(path, name)
    except MusarError as e:
        raise _damaged(directory, f"{name} is not readable JSON ({str(e).replace(f'{name} {path} ', '')})") from None
    if not isinstance(value, dict) or any(k not in value for k in keys):
        raise _damaged(directory, f"{name} lacks {', '.join(keys) or 'a JSON object'}")
    return value


def _tensor_file(directory: Path, name: str, keys: tuple[str, ...] = ()) -> dict[str, str]:
    path = directory / name
    if not path.is_file():
        raise _damaged(directory, f"{name} is missing")
    try:
        header = read_header(path, "checkpoint file")
    except MusarError as e:
        raise _damaged(directory, str(e).replace(str(path), name)) from None
    missing = [k for k in keys if k not in header.tensors]
    if missing:
        raise _damaged(directory, f"{name} lacks tensor {missing[0]!r}")
    return header.metadata


def _check_manifest(directory: Path) -> None:
    manifest = _json_object(directory, MANIFEST_FILE, ("files",))
    files = manifest["files"]
    if not isinstance(files, dict):
        raise _damaged(directory, f"{MANIFEST_FILE} lacks its file list")
    for name, entry in sorted(files.items()):
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(entry, dict):
            raise _damaged(directory, f"{MANIFEST_FILE} has a malformed entry {name!r}")
        if not path.is_file():
            raise _damaged(directory, f"{name} is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise _damaged(directory, f"{name} holds {size} bytes, {entry.get('size')} were saved")
        if file_sha256(path) != entry.get("sha256"):
            raise _damaged(directory, f"{name} differs from what was saved (sha256 mismatch)")


def check_manifest(directory: str | os.PathLike[str]) -> None:
    """Check every file a sealed folder's manifest lists (size and sha256) without loading any;
    raises :class:`DamagedCheckpoint` naming the first bad one."""
    directory = Path(directory)
    try:
        _check_manifest(directory)
    except DamagedCheckpoint:
        raise
    except (OSError, RecursionError, ValueError) as e:
        raise _damaged(directory, f"unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def validate_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file of a checkpoint without loading it; return trainer.json's content.

    Raises :class:`DamagedCheckpoint` (a one-line :class:`MusarError`) naming the first bad file;
    a folder without its manifest is damaged (every checkpoint is sealed with one).
    """
    directory = Path(directory)
    try:
        return _validate(directory)
    except DamagedCheckpoint:
        raise
    except (OSError, RecursionError, ValueError) as e:  # whatever else a hostile file makes a reader raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise _damaged(directory, f"unreadable ({type(e).__name__}: {first})") from None


def _integer(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _validate(directory: Path) -> dict[str, Any]:
    state = _json_object(directory, TRAINER_FILE, ("step", "data", "world_size"))
    step, world, data = state["step"], state["world_size"], state["data"]
    if not (_integer(step, 0) and _integer(world, 1) and isinstance(data, dict) and _integer(data.get("position"), 0)):
        raise _damaged(directory, f"{TRAINER_FILE} has a malformed step, world_size or data position")
    if not isinstance(state.get(RUN_CONFIG, {}), dict):
        raise _damaged(directory, f"{TRAINER_FILE} has a malformed {RUN_CONFIG}")
    fmt = _tensor_file(directory, "lora.safetensors").get("format")
    if fmt != LORA_FORMAT:
        raise _damaged(directory, f"lora.safetensors is not a MUSAR LoRA (header format {fmt!r})")
    _json_object(directory, "scheduler.json")
    if not (directory / "optimizer_backend").is_dir():  # DeepSpeed keeps its own format there
        names = ["optimizer"] if (directory / "optimizer.json").exists() or world == 1 else [
            f"optimizer_rank{r}" for r in range(world)]
        for name in names:
            _json_object(directory, f"{name}.json", ("param_groups",))
            _tensor_file(directory, f"{name}.safetensors")
    for rank in range(world):
        _json_object(directory, f"rng_rank{rank}.json", ("python", "numpy"))
        _tensor_file(directory, f"rng_rank{rank}.safetensors", ("torch",))
    _check_manifest(directory)  # last: the structural checks name the damage more precisely
    return state


def staging_dir(output_dir: str | os.PathLike[str], step: int) -> Path:
    return checkpoints_root(output_dir) / f".tmp-{checkpoint_name(step)}"


def write_manifest(staging: Path) -> None:
    """Give every file of a finished staging folder the common mode, fsync it, and record its
    size and sha256 in manifest.json (what :func:`validate_checkpoint` compares on resume)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        finish_file(path)
        files[path.relative_to(staging).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    for folder in {p.parent for p in staging.rglob("*")} | {staging}:
        fsync_dir(folder)
    atomic_write_json(staging / MANIFEST_FILE, {"format": 1, "files": files}, strict=True)


def commit(staging: Path, final: Path) -> Path:
    """Seal a finished staging folder (:func:`write_manifest`) and move it onto its final name,
    replacing an older one atomically."""
    write_manifest(staging)
    old = None
    if final.exists():
        # os.replace cannot replace a non-empty folder; move the old one aside first so the
        # final name is never missing for longer than two renames.
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
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


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise MusarError(f"cannot read checkpoint file {path}: {type(e).__name__}: {e}") from None


def read_json(path: Path) -> Any:
    return safe_load.read_json(path, "checkpoint file")


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
    """A torch optimizer ``state_dict`` -> (tensors for safetensors, the rest for JSON).

    Kept by hand instead of ``torch.save``/``torch.load(weights_only=True)``: that is still a
    pickle stream, and no checkpoint of ours may be one (tests/test_checkpoint_robustness.py)."""
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


def write_optimizer_state(state: dict[str, Any], directory: Path, name: str = "optimizer") -> None:
    tensors, meta = split_optimizer_state(state)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    write_json(directory / f"{name}.json", meta)


def read_optimizer_state(directory: Path, name: str = "optimizer") -> dict[str, Any]:
    path = directory / f"{name}.safetensors"
    if not path.is_file():
        raise MusarError(f"checkpoint {directory} has no optimizer state {path.name} (saved by another number of processes?)")
    return join_optimizer_state(load_tensors(path), read_json(directory / f"{name}.json"))
