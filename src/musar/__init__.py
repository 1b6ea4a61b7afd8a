"""MUSAR: multi-subject customization of FLUX.1-dev via attention routing."""

from musar.errors import MusarError

__version__ = "0.1.0"

__all__ = ["MusarError", "__version__"]
