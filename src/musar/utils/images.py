"""Reference images: any file or PIL image in, a clean RGB square out.

Users hand us whatever they have: RGBA PNGs, palette GIFs, CMYK JPEGs, 16-bit greyscale scans,
phone photos with an EXIF rotation. :func:`load_reference` turns any of them into an RGB square of
the condition size (aspect ratio kept by padding, or centre-cropped). Only Pillow and numpy here,
so input checks stay fast (the CLI runs them before loading any model).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from musar.errors import MusarError
from musar.utils.safe_load import as_path, open_regular, path_errors, shown
from musar.utils.validation import CONDITION_FITS, DEFAULT_CONDITION_FIT, DEFAULT_MAX_IMAGE_PIXELS, Fit

PAD_COLOUR = (255, 255, 255)  # references are mostly product-style shots on white
# Our own limit on an input image's pixel count, checked from the header before decoding; read at
# call time, like Pillow's Image.MAX_IMAGE_PIXELS. `--max-image-pixels` sets it for one run.
MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS


def open_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file, or raise a one-line :class:`MusarError`.

    The size is read from the header and checked against ``max_pixels`` (default
    :data:`MAX_IMAGE_PIXELS`) *before* anything is decoded, so a tiny file declaring a huge
    image costs nothing. Any failure to decode (truncated, corrupt, a decompression bomb, a
    format Pillow trips over) is the same one-line error: user files are untrusted input.
    """
    return _read(Path(path), max_pixels, decode=True)


def check_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of an image file from its header alone, within the pixel limit, or the
    one-line error :func:`open_image` would give. Cheap: nothing is decoded."""
    return _read(Path(path), max_pixels, decode=False)


def _read(path: Path, max_pixels: int | None, decode: bool) -> Any:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    path = as_path(path, "reference image")
    with path_errors("reference image", path):
        if path.is_dir():
            raise MusarError(f"reference image is a directory: {shown(path)}")
    try:
        with warnings.catch_warnings(), open_regular(path, "reference image") as f:
            # Our limit is stricter than Pillow's warning threshold; its warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # A damaged EXIF block warns while the header is read (JPEG looks for a DPI there);
            # the image is still good, and exif_transpose below ignores the block the same way.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
            with Image.open(f) as im:
                width, height = im.size  # from the header: nothing decoded yet
                if width * height > limit:
                    raise MusarError(
                        f"image too large: {shown(path)} is {width}x{height} ({width * height:,} pixels), "
                        f"above the limit of {limit:,} pixels (--max-image-pixels)"
                    )
                if not decode:
                    return width, height
                im.load()  # decode now: a truncated file fails here, not mid-generation
                return drop_bad_icc(im.copy())
    except MusarError:
        raise
    except Image.DecompressionBombError:
        raise MusarError(f"image too large: {shown(path)} declares more pixels than Pillow will decode") from None
    except UnidentifiedImageError:
        raise MusarError(f"not an image file: {shown(path)}") from None
    except PermissionError:
        raise MusarError(f"cannot read reference image (permission denied): {shown(path)}") from None
    except MemoryError:
        raise MusarError(f"cannot decode image {shown(path)}: out of memory") from None
    except Exception as e:  # decoders raise many types (OSError, SyntaxError, struct.error, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MusarError(f"cannot decode image {shown(path)}: {first[:200]}") from None


def drop_bad_icc(image: Image.Image) -> Image.Image:
    """``image`` without its ICC profile if littlecms cannot parse it (or is missing).

    Nothing here applies profiles, but a saved or converted copy carries ``info["icc_profile"]``
    on to code that might (Pillow's own ImageCms, a viewer); a malformed one is dropped here
    instead of failing there.
    """
    if "icc_profile" not in image.info:
        return image
    icc = image.info["icc_profile"]
    if not icc:  # Pillow leaves None where the chunk would not decompress
        image.info.pop("icc_profile", None)
        return image
    try:
        from PIL import ImageCms

        ImageCms.ImageCmsProfile(io.BytesIO(icc if isinstance(icc, bytes) else bytes(icc)))
    except Exception:  # lcms reports a bad profile as several types (PyCMSError, OSError, TypeError)
        image.info.pop("icc_profile", None)
    return image


def exif_transpose(image: Image.Image) -> Image.Image:
    """``image`` turned upright by its EXIF orientation, or unchanged if the EXIF is malformed.

    EXIF is an untrusted TIFF structure inside the file; Pillow's parser raises a zoo of types
    (SyntaxError, struct.error, KeyError, ValueError, ...) or warns on a damaged block. A photo
    shown without its rotation is better than no photo, so any failure means no rotation.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data", "Truncated File Read", ...
            return ImageOps.exif_transpose(image) or image
    except MemoryError:
        raise
    except Exception:
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited onto white, 16-bit scaled down properly."""
    image = exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-12)
        image = Image.fromarray((arr * 255 + 0.5).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("RGB", "L") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*PAD_COLOUR, 255))
        image = Image.alpha_composite(background, rgba)
    return drop_bad_icc(image.convert("RGB"))  # a new image: the caller's keeps its info


def fit_square(image: Image.Image, size: int, fit: Fit = DEFAULT_CONDITION_FIT) -> Image.Image:
    """Square ``size`` x ``size`` image: pad the short side (default) or centre-crop the long one."""
    if fit not in CONDITION_FITS:
        raise MusarError(f"unknown reference fit {fit!r}; expected {' or '.join(map(repr, CONDITION_FITS))}")
    if fit == "crop":
        return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)
    return ImageOps.pad(image, (size, size), method=Image.Resampling.LANCZOS, color=PAD_COLOUR)


def load_reference(
    image: Image.Image | str | os.PathLike[str], size: int, fit: Fit = DEFAULT_CONDITION_FIT, max_pixels: int | None = None
) -> Image.Image:
    """A user's reference (path or PIL image, any mode) as an RGB ``size`` square."""
    if not isinstance(image, Image.Image):
        image = open_image(image, max_pixels)
    if image.width == 0 or image.height == 0:
        raise MusarError("reference image has zero size")
    return fit_square(to_rgb(image), size, fit)




def open_rgb(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """An image file as upright RGB, read as defensively as a reference (regular file, pixel
    limit before decoding, malformed EXIF or ICC tolerated): for every other image read path."""
    return to_rgb(open_image(path, max_pixels))
