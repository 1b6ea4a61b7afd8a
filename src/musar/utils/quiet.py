"""Library messages a normal MUSAR run would print although nothing is wrong, silenced precisely.

Each filter drops one known message from one library logger, for a stated reason, and nothing
else: every other warning of these libraries still reaches the user. Installed once when the
``musar`` package is imported (cheap: no library is imported for it).

* transformers, ``CLIPImageProcessor`` / ``SiglipImageProcessor`` "requires torchvision (not
  installed); falling back to ...Pil". diffusers' FLUX pipeline module imports these processors
  for FLUX's optional IP-Adapter slot, which MUSAR never fills; the PIL fallback is what transformers
  used before its torchvision backend. torchvision is not declared on purpose: each torchvision
  release pins one torch release, so requiring it would pin the user's torch (and, on PyPI, pull a
  CUDA build of several GB onto CPU machines and CI), for two classes MUSAR does not use.
* diffusers, "Expected types for vae: (AutoencoderKL,), got <class 'pkg.Component'>" for a
  component class registered under the ``musar.components`` entry point (the miniature world's
  codec): by design not an ``AutoencoderKL``, but it implements the interface the pipeline calls.
* torchao (the optional ``quant`` extra), on machines where its compiled kernels cannot load: its
  own "Failed to load <kernel library>" lines, torch's deprecation of the enum registration it does
  at import, and diffusers' "Unable to import `torchao` Tensor objects". transformers and
  diffusers import torchao whenever it is installed, so without these filters every unquantised
  run would print them; a quantised run that needs a missing kernel still fails loudly.
* diffusers' torchao quantiser, "You are trying to set torch_dtype to torch.float32 for integer
  quantization, but only bfloat16 is supported": said for any int config, but MUSAR's only one is
  ``int8wo``, weight-only, whose matmuls run in the activation dtype; torchao runs it in float32
  (the CPU default) and tests/test_quantization.py holds its output within 2% of the unquantised
  one. Other dtypes (float16) are not measured, so their message still shows.
* While a standard LoRA loads: :func:`quiet_lora_loading` (below, with its reasons).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from functools import cache

_TORCHVISION_FALLBACK = re.compile(
    r"`(CLIPImageProcessor|SiglipImageProcessor)` requires torchvision \(not installed\); falling back to "
)
_EXPECTED_TYPES = re.compile(r"Expected types for \w+: .*, got <class '([\w.]+)\.\w+'>\.$")
_TORCHAO_KERNEL = re.compile(r"Failed to load .*/torchao/_C\w*\.\S+\.so: ")
_TORCHAO_ENUM = re.compile(r"is an Enum subclass and is now natively supported by torch\.compile")
_TORCHAO_TENSORS = "Unable to import `torchao` Tensor objects"
_TORCHAO_INT_FP32 = "You are trying to set torch_dtype to torch.float32 for integer quantization"


def _registered_component(message: str) -> bool:
    match = _EXPECTED_TYPES.search(message)
    if match is None:
        return False
    from musar.utils.registry import registered_component_modules

    return match.group(1) in registered_component_modules()


def _torchao_enum(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    return bool(_TORCHAO_ENUM.search(record.msg if isinstance(record.msg, str) else "")) and any(
        "torchao" in str(getattr(a, "__module__", "")) for a in args
    )


# logger name -> predicate on the record: True = drop it.
_RULES: dict[str, Callable[[logging.LogRecord], bool]] = {
    "transformers.utils.import_utils": lambda r: bool(_TORCHVISION_FALLBACK.match(r.getMessage())),
    "diffusers.pipelines.pipeline_utils": lambda r: _registered_component(r.getMessage()),
    "torchao": lambda r: bool(_TORCHAO_KERNEL.match(r.getMessage())),
    "torch.utils._pytree": _torchao_enum,
    "diffusers.quantizers.torchao.torchao_quantizer": lambda r: r.getMessage().startswith(
        (_TORCHAO_TENSORS, _TORCHAO_INT_FP32)
    ),
}


class _Drop(logging.Filter):
    def __init__(self, predicate: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.predicate = predicate

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.predicate(record)
        except Exception:  # a filter must never break logging: keep the message
            return True


@cache
def install() -> None:
    """Add the filters to their loggers (once per process)."""
    for name, predicate in _RULES.items():
        logging.getLogger(name).addFilter(_Drop(predicate))


# While a standard FLUX LoRA loads (MusarLoraLoaderMixin.load_lora_weights), two messages say
# nothing is wrong:
# * diffusers, "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'":
#   FLUX LoRAs adapt the transformer; a file without text-encoder keys is the normal case (a LoRA
#   *with* them still loads them, and a LoRA with no keys at all fails on the transformer).
# * peft, "Already found a `peft_config` attribute in the model": a second adapter on one model is
#   what stacking LoRAs means (diffusers adds every adapter this way).
# Only during that call, so the same messages from the user's own peft code still show.
_NO_TEXT_ENCODER_KEYS = re.compile(r"No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'")
_LORA_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.peft", "diffusers.loaders.lora_pipeline")


@contextlib.contextmanager
def quiet_lora_loading() -> Iterator[None]:
    drop = _Drop(lambda r: bool(_NO_TEXT_ENCODER_KEYS.match(r.getMessage())))
    loggers = [logging.getLogger(name) for name in _LORA_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Already found a `peft_config` attribute in the model",
                                    category=UserWarning)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
