"""A local FLUX model folder, judged before any weight loads: its index and its components' sizes.

diffusers trusts a folder: ``model_index.json`` of ``{}`` or a list fails deep inside it with a
traceback, a class it does not expect is imported and built, and a ``transformer/config.json``
saying ``num_layers: 1000000000`` or ``attention_head_dim: 10**6`` makes it try to allocate
terabytes (or hang) before anything looks at the numbers. Here one mechanism covers the class:

* every JSON file is read with :mod:`musar.utils.safe_load` (regular file, bounded, UTF-8, a
  mapping at the top);
* the index names, per component slot, a ``[library, class]`` whose class must be of the kind the
  slot holds (a diffusers model for ``transformer``/``vae``, a transformers model for the text
  encoders, a tokenizer, a scheduler) — resolved without building anything;
* every size in a component's config (a key that counts layers, heads, channels or dimensions)
  must be a plain non-negative integer, and the parameter count the config implies must fit
  :data:`PARAM_BUDGET`.

The folder is never changed. Hub ids are checked by diffusers after download (nothing local to read).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from musar.errors import MusarError
from musar.utils.registry import registered_component_modules
from musar.utils.safe_load import read_json

# Twice FLUX.1-dev's largest component (its transformer, 11.9e9 parameters), per component. A
# fixed number, not this machine's RAM: a model may load offloaded, quantised (0.5 byte a
# parameter) or spread over GPUs, so RAM says nothing about what fits; what no FLUX-family
# checkpoint comes near is a corrupt or hostile config, and it is refused the same everywhere.
PARAM_BUDGET = 24_000_000_000
MAX_SIZE = 1 << 24  # any single width, count or vocabulary; keeps the arithmetic below small

PIPELINE_CLASSES = frozenset({"FluxPipeline", "MusarPipeline"})
# slot -> (library whose base class the slot's class must derive from, that base, required?)
SLOTS: dict[str, tuple[str, str, bool]] = {
    "transformer": ("diffusers", "ModelMixin", True),
    "vae": ("diffusers", "ModelMixin", True),
    "scheduler": ("diffusers", "SchedulerMixin", True),
    "text_encoder": ("transformers", "PreTrainedModel", True),
    "text_encoder_2": ("transformers", "PreTrainedModel", True),
    "tokenizer": ("transformers", "PreTrainedTokenizerBase", True),
    "tokenizer_2": ("transformers", "PreTrainedTokenizerBase", True),
    "image_encoder": ("transformers", "PreTrainedModel", False),
    "feature_extractor": ("transformers", "ImageProcessingMixin", False),
}
CONFIG_NAMES = {"scheduler": "scheduler_config.json"}
_SIZE_KEY = re.compile(
    r"(^|_)(num|n)_|_(dim|dims|size|channels|layers|heads)$|^d_(model|ff|kv)$|^vocab|^max_position_embeddings$|^layers_per_block$"
)
_NOT_SIZES = frozenset({"sample_size", "patch_size"})  # sizes, but checked as plain integers only


def check_model_folder(folder: str | os.PathLike[str], resolve_classes: bool = True) -> None:
    """Refuse a local pipeline folder whose index or component configs are broken, hostile or
    too big, with one line naming the file and the key. ``resolve_classes=False`` skips importing
    diffusers/transformers to check the index's class names (the CLI's pre-import check)."""
    spec = str(folder)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        check_hub_model(spec)  # a hub id: diffusers downloads and reads it, unless offline
        return
    index_path = folder / "model_index.json"
    index = read_json(index_path, "model index", expect=dict)
    where = f"model index {index_path}"
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise MusarError(f"{where}: key '_class_name' is {name!r}; expected one of {', '.join(sorted(PIPELINE_CLASSES))}")
    for key, entry in index.items():
        if key.startswith("_"):
            continue
        if key not in SLOTS:
            raise MusarError(f"{where}: key {key!r} is not a component of a FLUX pipeline ({', '.join(SLOTS)})")
        _check_entry(where, key, entry, resolve_classes)
    missing = [k for k, (_, _, required) in SLOTS.items() if required and _is_empty(index.get(k))]
    if missing:
        raise MusarError(f"{where}: no {', '.join(repr(k) for k in missing)} component")
    for key in SLOTS:
        config = folder / key / CONFIG_NAMES.get(key, "config.json")
        if not _is_empty(index.get(key)) and config.is_file():
            check_component_config(config, key)


def check_hub_model(spec: str, timeout: float = 10.0) -> None:
    """A hub id that is not in the local cache: find out at once whether the hub will give it.

    Offline (``HF_HUB_OFFLINE=1``) that is a refusal naming the cure. Online, one request for its
    ``model_index.json`` (no retries) tells an unreachable hub, a gated or unknown repo and a repo
    that is not a diffusers pipeline apart in well under a second, where diffusers' download would
    print retry warnings for ~35 s and end on "does not appear to have a file named config.json".
    """
    from huggingface_hub import constants, try_to_load_from_cache

    repo, _, revision = spec.partition("@")
    try:
        cached = try_to_load_from_cache(repo, "model_index.json", revision=revision or None)
    except ValueError:  # not a valid repo id: the caller's own id check words that
        return
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise MusarError(
            f"{spec} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
            f"download it where the hub is reachable (`huggingface-cli download {repo}`, after `huggingface-cli "
            "login` and accepting its licence if it is gated) or give a local model folder"
        )
    _probe_hub(spec, repo, revision or None, timeout)


def _probe_hub(spec: str, repo: str, revision: str | None, timeout: float) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RevisionNotFoundError

    from musar.errors import hub_failure

    try:
        get_hf_file_metadata(hf_hub_url(repo, "model_index.json", revision=revision), timeout=timeout)
    except RevisionNotFoundError:
        raise MusarError(f"{spec}: the hub has no revision {revision!r} of {repo}") from None
    except EntryNotFoundError:
        raise MusarError(f"{spec} has no model_index.json on the hub: it is not a diffusers pipeline "
                         "(MUSAR needs a FLUX.1 pipeline repo such as black-forest-labs/FLUX.1-dev)") from None
    except HfHubHTTPError as exc:
        line = hub_failure(exc, repo=spec)
        if line is not None:  # gated, unknown or private
            raise MusarError(line) from None
        # any other answer (rate limit, a 5xx) may pass: diffusers' download retries those itself
    except Exception as exc:
        # Only the HTTP client's transport errors (httpx, requests, urllib3, sockets) mean "the hub
        # cannot be reached"; anything else is a bug and keeps its traceback.
        if not (isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _TRANSPORT_MODULES):
            raise
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise MusarError(
            f"{spec} is not in the local Hugging Face cache and the hub cannot be reached ({reason}); connect "
            f"and run again, download it elsewhere (`huggingface-cli download {repo}`) and copy the cache, or give a "
            "local model folder (set HF_HUB_OFFLINE=1 to skip the hub entirely)"
        ) from None


_TRANSPORT_MODULES = frozenset({"httpx", "httpx2", "httpcore", "requests", "urllib3", "socket", "ssl"})


def _is_empty(entry: Any) -> bool:
    return entry is None or (isinstance(entry, list) and all(e is None for e in entry))


def _check_entry(where: str, key: str, entry: Any, resolve: bool) -> None:
    if not (isinstance(entry, list) and len(entry) == 2 and all(e is None or isinstance(e, str) for e in entry)):
        raise MusarError(f"{where}: key {key!r} must be [library, class], got {entry!r:.80}")
    if _is_empty(entry):
        if SLOTS[key][2]:
            raise MusarError(f"{where}: key {key!r} is empty; a FLUX pipeline needs it")
        return
    library, cls_name = entry
    if library is None or cls_name is None:
        raise MusarError(f"{where}: key {key!r} must be [library, class], got {entry!r:.80}")
    registered = registered_component_modules()
    if library not in {"diffusers", "transformers", *registered}:
        raise MusarError(f"{where}: key {key!r} names library {library!r}; expected diffusers, transformers "
                         f"or a registered musar component module")
    if resolve:
        _check_class(where, key, library, cls_name, library in registered)


def _check_class(where: str, key: str, library: str, cls_name: str, registered: bool) -> None:
    base_library, base_name, _ = SLOTS[key]
    base = getattr(importlib.import_module(base_library), base_name)
    try:
        module = importlib.import_module(library)
        cls = getattr(module, cls_name) if cls_name.isidentifier() else None
    except (ImportError, AttributeError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        found = "a registered component module" if registered else library
        raise MusarError(f"{where}: key {key!r} names {cls_name!r} of {found}, which is not a {base_library} "
                         f"{base_name} (what the {key} of a FLUX pipeline must be)")


def check_component_config(path: Path, component: str) -> dict[str, Any]:
    """One component's config: sizes are plain integers and the implied model fits the budget."""
    config = read_json(path, f"{component} config", expect=dict)
    where = f"{component} config {path}"
    for key, value in config.items():
        if _SIZE_KEY.search(key) or key in _NOT_SIZES:
            _check_sizes(where, key, value)
    estimate = ESTIMATORS.get(component)
    if estimate is not None:
        params = estimate(config)
        if params > PARAM_BUDGET:
            raise MusarError(f"{where} describes a model of about {params:.3g} parameters, more than the "
                             f"{PARAM_BUDGET:.3g} musar loads (twice FLUX.1-dev's transformer); is it the right file?")
    return config


def _check_sizes(where: str, key: str, value: Any) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None and not isinstance(value, list):
            return  # "unset": the library's default, e.g. out_channels
        if isinstance(v, bool) or not isinstance(v, int):
            raise MusarError(f"{where}: key {key!r} must be a whole number, got {v!r:.40}")
        if not 0 <= v <= MAX_SIZE:
            raise MusarError(f"{where}: key {key!r} must be between 0 and {MAX_SIZE:,}, got {v!r:.40}")


def _int(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    return default if value is None else int(value)


def flux_transformer_params(config: dict[str, Any]) -> int:
    """Parameters of a FluxTransformer2DModel with this config (exact for diffusers 0.3x-0.4x),
    from the sizes alone: nothing is allocated."""
    heads, head_dim = _int(config, "num_attention_heads", 24), _int(config, "attention_head_dim", 128)
    d = heads * head_dim
    in_ch, patch = _int(config, "in_channels", 64), _int(config, "patch_size", 1)
    out_ch = _int(config, "out_channels", in_ch)
    joint, pooled = _int(config, "joint_attention_dim", 4096), _int(config, "pooled_projection_dim", 768)

    def linear(i: int, o: int) -> int:
        return i * o + o

    # timestep (+ guidance) and pooled-text MLPs, context and latent embedders
    embed = (linear(256, d) + linear(d, d)) * (2 if config.get("guidance_embeds") else 1)
    embed += linear(pooled, d) + linear(d, d) + linear(joint, d) + linear(in_ch, d)
    qk_norms = 2 * head_dim
    double = 2 * linear(d, 6 * d) + 6 * linear(d, d) + 2 * linear(d, d) + 2 * qk_norms
    double += 2 * (linear(d, 4 * d) + linear(4 * d, d))
    single = linear(d, 3 * d) + linear(d, 4 * d) + linear(5 * d, d) + 3 * linear(d, d) + qk_norms
    head = linear(d, 2 * d) + linear(d, patch * patch * out_ch)
    return embed + _int(config, "num_layers", 19) * double + _int(config, "num_single_layers", 38) * single + head


def text_encoder_params(config: dict[str, Any]) -> int:
    """An upper estimate for a CLIP or T5 text encoder (attention, a gated MLP, embeddings)."""
    width = _int(config, "d_model", 0) or _int(config, "hidden_size", 0)
    inner = _int(config, "num_heads", 0) * _int(config, "d_kv", 0) or width
    ffn = _int(config, "d_ff", 0) or _int(config, "intermediate_size", 0) or 4 * width
    layers = _int(config, "num_layers", 0) or _int(config, "num_hidden_layers", 0)
    vocab = _int(config, "vocab_size", 0) + _int(config, "max_position_embeddings", 0)
    return layers * (4 * width * inner + 3 * width * ffn + 4 * width) + vocab * width


ESTIMATORS: dict[str, Callable[[dict[str, Any]], int]] = {
    "transformer": flux_transformer_params,
    "text_encoder": text_encoder_params,
    "text_encoder_2": text_encoder_params,
}
