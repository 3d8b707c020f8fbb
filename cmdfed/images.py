"""Image files as uint8 RGB arrays: what the dataset importers and `cmdfed predict` read.

Alpha is dropped, grey becomes RGB, uint16 is scaled by 255/65535 (rounded; an H&E RGB
image uses the full 16-bit range), floats are read as 0-255 (PanNuke's convention) or,
when no value exceeds 1, as 0-1.

Files: PNG/JPEG and other formats through Pillow, TIFF through tifffile (first page).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from cmdfed.errors import CmdfedError

TIFF_SUFFIXES = (".tif", ".tiff")


def to_rgb_uint8(array: np.ndarray, file: Path) -> np.ndarray:
    """An image of any common layout and dtype as uint8 (H, W, 3); see the module docstring."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] in (1, 2):  # grey, grey + alpha
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise CmdfedError(f"{file}: expected a grey, RGB or RGBA image, got an array of shape {array.shape}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise CmdfedError(f"{file}: image holds NaN or infinite values")
        scale = 255.0 if array.max() <= 1.0 else 1.0
        return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    raise CmdfedError(f"{file}: cannot read {array.dtype} pixel values as an 8-bit RGB image")


def read_image_file(path: Path, *, labels: bool = False) -> np.ndarray:
    """The pixel array of a PNG/JPEG (Pillow) or TIFF (tifffile, first page).

    Palette and other non-RGB colour modes are converted to RGB for images; for label files
    (``labels=True``) the stored values are returned as they are, since a palette PNG's
    indices are its labels.
    """
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                array = page.asarray()
                if page.axes.startswith("S") and array.ndim == 3:  # planar RGB: samples first
                    array = np.moveaxis(array, 0, -1)
                return array
        with Image.open(path) as image:
            if not labels and image.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
                image = image.convert("RGB")
            return np.asarray(image)
    except Image.DecompressionBombError as exc:
        raise CmdfedError(
            f"{path} is too large to read as one image ({exc}); tile it with `cmdfed data tile-slide`"
        ) from exc
    except Exception as exc:  # decoders report damaged files with many exception types
        raise CmdfedError(
            f"cannot read image {path} ({type(exc).__name__}: {exc}); the file is damaged or not an image"
        ) from exc


def read_rgb(path: Path) -> np.ndarray:
    return to_rgb_uint8(read_image_file(path), path)
