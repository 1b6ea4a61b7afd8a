"""What ``--quantize`` accepts, checked before any model loads (no torch or diffusers at import).

One value names one quantisation of the two big components, FLUX's transformer (12B) and its T5
text encoder (4.7B), through diffusers' and transformers' own quantisation configs
(:mod:`musar.pipelines.quantization` builds them):

* ``none``   -- the weights in ``--dtype`` (default);
* ``int8wo`` -- torchao int8 weight-only (per-row scales), CPU and CUDA;
* ``fp8wo``  -- torchao float8 (e4m3) weight-only, CPU and CUDA;
* ``nf4``    -- bitsandbytes 4-bit NormalFloat, CUDA only;
* ``gguf:PATH`` -- the transformer from a GGUF single-file checkpoint (e.g. a ``Q8_0`` or ``Q4_K``
  FLUX.1-dev GGUF); the text encoders stay in ``--dtype``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from musar.errors import MusarError

Mode = Literal["none", "int8wo", "fp8wo", "nf4", "gguf"]
MODES: tuple[str, ...] = ("none", "int8wo", "fp8wo", "nf4")
GGUF_PREFIX = "gguf:"
HELP = (
    "quantise the transformer and T5 on load: int8wo / fp8wo (torchao), nf4 (bitsandbytes, CUDA), "
    "or gguf:PATH (transformer from a GGUF file); default none"
)
# Which optional package each mode needs, and the extra that installs it.
_NEEDS: dict[str, tuple[str, str]] = {
    "int8wo": ("torchao", "quant"),
    "fp8wo": ("torchao", "quant"),
    "nf4": ("bitsandbytes", "nf4"),
    "gguf": ("gguf", "quant"),
}


@dataclass(frozen=True)
class QuantizeSpec:
    """One ``--quantize`` value: the mode and, for ``gguf``, the checkpoint file."""

    mode: Mode = "none"
    path: Path | None = None

    @classmethod
    def parse(cls, value: str | QuantizeSpec | None) -> QuantizeSpec:
        if value is None:
            return cls()
        if isinstance(value, QuantizeSpec):
            return value
        if value.startswith(GGUF_PREFIX):
            path = value[len(GGUF_PREFIX):]
            if not path:
                raise MusarError("--quantize gguf:PATH needs the path of a .gguf file after 'gguf:'")
            return cls("gguf", Path(path))
        if value not in MODES:
            raise MusarError(f"unknown --quantize value {value!r}; expected one of {', '.join(MODES)} or gguf:PATH")
        return cls(value)  # type: ignore[arg-type]

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def __str__(self) -> str:
        return f"{GGUF_PREFIX}{self.path}" if self.mode == "gguf" else self.mode

    def check(self, device: str | None = None) -> None:
        """Everything that can be wrong before a model loads: missing package, no GPU, bad file."""
        if not self.enabled:
            return
        if self.mode == "gguf":
            check_gguf_file(self.path)
        self.check_backend(device)

    def check_backend(self, device: str | None = None) -> None:
        """The package this mode needs is installed and the device can run it."""
        if not self.enabled:
            return
        package, extra = _NEEDS[self.mode]
        if importlib.util.find_spec(package) is None:
            raise MusarError(f"--quantize {self.mode} needs the {package} package: pip install 'musar[{extra}]'")
        if self.mode == "nf4" and (device or "cuda").split(":")[0] != "cuda":
            raise MusarError("--quantize nf4 (bitsandbytes) runs on CUDA GPUs only; on CPU use int8wo or fp8wo")


def check_gguf_file(path: Path | None) -> None:
    """The whole bounded header audit (:func:`musar.pipelines.gguf.read_gguf_header`): a FIFO, a
    truncated file or a hostile count is named here, before anything loads."""
    if path is None or not path.exists():
        raise MusarError(f"GGUF file not found: {path}")
    from musar.pipelines.gguf import read_gguf_header

    read_gguf_header(path)


def check_quantize_arg(value: str) -> None:
    """The CLI's check of ``--quantize`` in the one validation pass (package, GGUF file)."""
    QuantizeSpec.parse(value).check()


class QuantizeChoices(Container[str]):
    """``choices=`` for argparse: the fixed modes plus any ``gguf:PATH`` (the path is checked later,
    with the other inputs, before the model loads)."""

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and (value in MODES or (value.startswith(GGUF_PREFIX) and len(value) > len(GGUF_PREFIX)))

    def __iter__(self) -> Iterator[str]:
        return iter((*MODES, f"{GGUF_PREFIX}PATH"))


QUANTIZE_CHOICES = QuantizeChoices()
METAVAR = "{" + ",".join(QUANTIZE_CHOICES) + "}"
