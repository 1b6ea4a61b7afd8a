"""The rules every command checks before anything heavy runs: numbers, paths, presets, headers.

Two kinds of rules, both pure of torch and of side effects:

* :class:`Number` — one numeric value: int or float, finite, inside documented bounds, optionally
  a multiple of something. A rule is an argparse ``type=`` (bad text becomes argparse's one-line
  error) *and* a check the Python API calls (:meth:`Number.check` raises a one-line
  :class:`~musar.errors.MusarError`), so the CLI, the pipeline and the UI refuse the same values
  in the same words. :data:`RULES` lists them all; docs/validation.md is its table.
* path checks — ``check_*`` functions that look at the file system without changing it (no folder
  is created, a probe file is removed at once): inputs readable, outputs writable *including every
  file written beside them* (an image's sidecar), LoRA headers well formed, preset names known.

The CLI wires both to its arguments in one declaration each (:mod:`musar.cli.args`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from musar.errors import MusarError
from musar.utils.safe_load import as_path, check_regular_file, parse_json, path_errors, shown


@dataclass(frozen=True)
class Number:
    """One numeric argument: its type and inclusive bounds (``None``: unbounded)."""

    name: str
    kind: type[int] | type[float]
    lo: float | None = None
    hi: float | None = None
    multiple_of: int | None = None
    why: str = ""  # where the bounds come from (docs/validation.md)

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.name

    def describe(self) -> str:
        noun = "integer" if self.kind is int else "finite number"
        if self.lo is not None and self.hi is not None:
            text = f"{noun} from {_fmt(self.lo)} to {_fmt(self.hi)}"
        elif self.lo is not None:
            text = f"{noun} >= {_fmt(self.lo)}"
        elif self.hi is not None:
            text = f"{noun} <= {_fmt(self.hi)}"
        else:
            text = noun
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def problem(self, value: object) -> str | None:
        """What is wrong with ``value`` ("must be ..., got ..."), or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if self.kind is int and not isinstance(value, int):
            if not (math.isfinite(value) and value == int(value)):
                return f"must be a whole number, got {value!r}"
            value = int(value)
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        lo_bad = self.lo is not None and value < self.lo
        hi_bad = self.hi is not None and value > self.hi
        if lo_bad or hi_bad:
            if self.lo is not None and self.hi is not None:
                return f"must be between {_fmt(self.lo)} and {_fmt(self.hi)}, got {value!r}"
            return f"must be >= {_fmt(self.lo)}, got {value!r}" if lo_bad else f"must be <= {_fmt(self.hi)}, got {value!r}"
        if self.multiple_of and value % self.multiple_of:
            return f"must be a multiple of {self.multiple_of}, got {value!r}"
        return None

    def check(self, value: object, name: str | None = None) -> int | float:
        """``value`` if it passes, else ``MusarError("<name> must be ..., got ...")``."""
        problem = self.problem(value)
        if problem is not None:
            raise MusarError(f"{name or self.name} {problem}")
        return self.kind(value)  # type: ignore[arg-type]

    def __call__(self, text: str) -> int | float:
        """argparse ``type=``: parse ``text`` and check it."""
        try:
            value: int | float = int(text) if self.kind is int else float(text)
        except ValueError:
            noun = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
        problem = self.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


# -- the rules -----------------------------------------------------------------------------------

MIN_SIZE, MAX_SIZE = 64, 4096
# torch.Generator.manual_seed takes [-2^63, 2^64 - 1]; we stop at 2^63 - 1 so a seed also fits an
# int64 anywhere it travels (and the UI's seed box, which says the same).
MAX_SEED = 2**63 - 1
# Our default pixel limit for input images (musar.utils.images.MAX_IMAGE_PIXELS): 50 MP holds any
# phone or camera photo short of the 100+ MP sensors, and decodes to ~150 MB of RGB.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# Pillow refuses images above twice its MAX_IMAGE_PIXELS (89,478,485) as decompression bombs.
PILLOW_HARD_LIMIT = 2 * 89_478_485

SEED = Number("seed", int, 0, MAX_SEED, why="torch.Generator.manual_seed range, kept within int64")
STEPS = Number("steps", int, 1, 1000, why="FLUX.1-dev uses 28; 1000 is the scheduler's own timestep count")
GUIDANCE = Number("guidance", float, 0, 100, why="FLUX guidance embedding; 3.5 is FLUX.1-dev's default")
HEIGHT = Number("height", int, MIN_SIZE, MAX_SIZE, 16, why="16 px per latent token (VAE 8 x patch 2)")
WIDTH = Number("width", int, MIN_SIZE, MAX_SIZE, 16, why="16 px per latent token (VAE 8 x patch 2)")
CONDITION_SIZE = Number("condition size", int, 16, 2048, 16, why="2048 px = 16384 tokens per reference; the paper uses 512")
MAX_IMAGE_PIXELS = Number("max image pixels", int, 1, PILLOW_HARD_LIMIT, why="Pillow's decompression-bomb limit")
PORT = Number("port", int, 1, 65535, why="TCP ports")
COUNT = Number("count", int, 1, why="a number of things (cases, steps)")
METRICS_BATCH = Number("metrics batch size", int, 1, 4096)
TRAIN_SEED = Number("seed", int, 0, 2**32 - 1, why="numpy.random.seed's range (training seeds numpy, python and torch)")
REFS = Number("number of references", int, 0, 16)
BENCH_SIZE = Number("size", int, 16, MAX_SIZE, 16, why="16 px per latent token")
TOKENS = Number("token count", int, 1, 4096)
REPEATS = Number("repeats", int, 1, 10_000)
WARMUP = Number("warmup", int, 0, 1000)
THREADS = Number("threads", int, 1, 1024)
# How a reference becomes a square, offered by everything that generates (the CLI's
# --condition-fit, the UI) and applied by musar.utils.images.fit_square. The attention backends
# are musar.models.options.BACKENDS, the outside-boxes policies musar.models.boxes.OUTSIDE_POLICIES.
Fit = Literal["pad", "crop"]
CONDITION_FITS: tuple[str, ...] = get_args(Fit)
DEFAULT_CONDITION_FIT: Fit = "pad"
# Layout box coordinates are checked by musar.models.boxes.check_box (a box is 4 numbers or "none").

# Resource bounds: values a config file or a LoRA header can set that size memory or processes.
# They catch a typo (or a hostile file) before it allocates, far above any real run.
LORA_RANK = Number("LoRA rank", int, 1, 4096,
                   why="FLUX's hidden size is 3072, a rank above it adds nothing; the paper uses 4 and 128")
LORA_ALPHA = Number("LoRA alpha", float, 0, 65504,
                    why="scale numerator (alpha / rank); 65504 is the largest fp16 value")
LORA_DROPOUT = Number("LoRA dropout", float, 0, 1, why="a probability")
BATCH_SIZE = Number("batch size", int, 1, 1024,
                    why="samples per process; FLUX at 512 px fits a handful per 80 GB GPU, 1024 only catches typos")
NUM_WORKERS = Number("DataLoader workers", int, 0, 64,
                     why="processes per rank, each holding a reader and prefetched images; a fixed cap so a "
                         "config means the same on every machine")
PREVIEW_SAMPLES = Number("number of samples", int, 1, 256,
                         why="one 168 px contact-sheet row each; 256 rows is a ~130 MB RGB sheet")

RULES: tuple[Number, ...] = (
    SEED, STEPS, GUIDANCE, HEIGHT, WIDTH, CONDITION_SIZE, MAX_IMAGE_PIXELS, PORT, COUNT, METRICS_BATCH,
    TRAIN_SEED, REFS, BENCH_SIZE, TOKENS, REPEATS, WARMUP, THREADS, LORA_RANK, LORA_ALPHA, LORA_DROPOUT,
    BATCH_SIZE, NUM_WORKERS, PREVIEW_SAMPLES,
)


def check_generation(
    *, height: int, width: int, steps: int, guidance: float, condition_size: int, seed: int | None = None
) -> None:
    """The numbers of one generation call (the pipeline, the CLI and the UI agree on them)."""
    HEIGHT.check(height)
    WIDTH.check(width)
    STEPS.check(steps)
    GUIDANCE.check(guidance)
    CONDITION_SIZE.check(condition_size)
    if seed is not None:
        SEED.check(seed)


def nonempty_text(name: str) -> Callable[[str], str]:
    """argparse ``type=`` for free text that must not be blank."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{name} is empty")
        return text

    parse.__name__ = name
    return parse


def key_value(text: str) -> str:
    """argparse ``type=`` for ``KEY=VALUE`` overrides."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"not of the form KEY=VALUE: {text!r}")
    return text


def device_name(text: str) -> str:
    """argparse ``type=`` for a torch device name: cpu, cuda or cuda:N."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


# -- paths ---------------------------------------------------------------------------------------


def check_input_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """An existing, readable regular file (a FIFO or a device would block or never end)."""
    path = check_regular_file(path, what)
    with path_errors(what, path):
        if not os.access(path, os.R_OK):
            raise MusarError(f"cannot read {what} (permission denied): {shown(path)}")
    return path


def check_input_dir(path: str | os.PathLike[str], what: str = "folder") -> Path:
    path = as_path(path, what)
    with path_errors(what, path):
        if not path.exists():
            raise MusarError(f"{what} not found: {shown(path)}")
        if not path.is_dir():
            raise MusarError(f"{what} is not a folder: {shown(path)}")
    return path


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_folder(folder: Path, target: Path) -> None:
    """Really try to create a file where ``target``'s folder is or would be (permission bits
    mislead on read-only mounts and for root), then remove it; create no folder."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise MusarError(f"output path is not writable: {shown(target)} ({shown(existing)} is a file, not a folder)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".musar-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MusarError(f"output path is not writable: {shown(target)} ({e.strerror or e})") from None


def check_output_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files about to be written (replaced if present): none is a folder, each folder writable."""
    checked = []
    for p in paths:
        path = as_path(p, "output")
        with path_errors("output path", path):
            # One stat, judged once: another writer may replace the file between two separate
            # checks (exists, then is_file), and a path that vanished in between is not wrong.
            try:
                mode: int | None = path.stat().st_mode
            except (FileNotFoundError, NotADirectoryError):  # absent, or under a file: the probe says which
                mode = None
            if mode is not None and stat.S_ISDIR(mode):
                raise MusarError(f"output path is a folder: {shown(path)}")
            if mode is not None and not stat.S_ISREG(mode):
                raise MusarError(f"output path is not a regular file: {shown(path)}")
            _probe_folder(path.parent, path)
        checked.append(path)
    return checked


def check_output_dir(path: str | os.PathLike[str], files: Iterable[str] = ()) -> Path:
    """A folder to write into (created later if missing) and the ``files`` to be written in it."""
    path = as_path(path, "output folder")
    with path_errors("output folder", path):
        if path.exists() and not path.is_dir():
            raise MusarError(f"output folder is a file: {shown(path)}")
        check_output_files(path / f for f in files)
        _probe_folder(path, path)
    return path


def sidecar_path(image: str | os.PathLike[str]) -> Path:
    """Where an image's JSON sidecar lives: same name, ``.json``."""
    return Path(image).with_suffix(".json")


def check_image_output(path: str | os.PathLike[str], suffix: str = ".png") -> Path:
    """An output image *and its sidecar*: both must be writable before any work starts."""
    path = as_path(path, "output image")
    if path.suffix.lower() != suffix:
        raise MusarError(f"must be a {suffix} file, got {path}")
    check_output_files([path, sidecar_path(path)])
    return path


# -- models, presets, LoRA files -------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[\w./-]+)?$")


def check_model_source(spec: str, what: str = "model", marker: str = "model_index.json") -> None:
    """A local folder must hold ``marker`` (a diffusers pipeline's ``model_index.json``, a
    transformers model's ``config.json``); anything else must read as a hub id (``org/name``), so
    a mistyped local path fails now instead of as a download attempt."""
    path = as_path(spec, what)
    if path.exists():
        if not path.is_dir():
            raise MusarError(f"{what} {spec!r} is a file; give a model folder or a hub id")
        if not (path / marker).is_file():
            raise MusarError(f"{what} folder {spec!r} has no {marker}")
        return
    if not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        raise MusarError(f"{what} {spec!r} is neither an existing folder nor a hub id like org/name")


def check_preset_name(name: str) -> None:
    from musar.utils.registry import check_preset  # entry points only, no model module

    check_preset(name)


LORA_FORMAT = "musar-branch-lora"  # the "format" in a MUSAR LoRA file's header (musar.lora.io writes it)


def _integer(value: object, rule: Number, name: str) -> int:
    # A header is JSON we did not write: 4.0 or true would pass Number's whole-number test and
    # then reach torch as a float or a bool.
    if isinstance(value, bool) or not isinstance(value, int):
        raise MusarError(f"{name} must be an integer, got {value!r}")
    return int(rule.check(value, name))


def check_lora_config(config: object, where: str) -> dict[str, object]:
    """The ``lora_config`` a LoRA header carries, checked before any tensor is allocated: ranks,
    alphas, dropout, mode and targets have the types and bounds a trained file can have."""
    if not isinstance(config, dict):
        raise MusarError(f"{where}: the LoRA config is not a mapping")
    for key in ("noise_rank", "subject_rank"):
        if key in config:
            _integer(config[key], LORA_RANK, f"{where}: {key}")
    for key in ("noise_alpha", "subject_alpha"):
        if config.get(key) is not None:
            LORA_ALPHA.check(config[key], f"{where}: {key}")
    if "dropout" in config:
        LORA_DROPOUT.check(config["dropout"], f"{where}: dropout")
    if "mode" in config and config["mode"] not in ("dual", "shared"):
        raise MusarError(f"{where}: mode must be 'dual' or 'shared', got {config['mode']!r}")
    targets = config.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise MusarError(f"{where}: targets must be a list of module patterns, got {targets!r}")
    return config


def check_lora_file(path: str | os.PathLike[str]) -> Path:
    """A MUSAR LoRA file, judged by its header (no tensor is read): safetensors, complete, ours."""
    from musar.utils.tensorfile import read_header

    path = check_input_file(path, "LoRA file")
    try:
        header = read_header(path, "LoRA file")
    except MusarError as e:
        if "is not a safetensors file" in str(e):
            raise MusarError(f"{e}; LoRA weights load from safetensors only") from None
        raise
    fmt = header.metadata.get("format")
    if fmt != LORA_FORMAT:
        raise MusarError(f"{shown(path)} is a safetensors file but not a MUSAR branch LoRA (header format {fmt!r})")
    where = f"the LoRA config in {shown(path)}"
    if "lora_config" not in header.metadata:
        raise MusarError(f"{shown(path)} has no LoRA config in its header")
    check_lora_config(parse_json(header.metadata["lora_config"], where), where)
    return path
