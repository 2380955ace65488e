"""Turn whatever the caller has (a path, a PIL image, an array) into RGB uint8.

The whole project speaks RGB (PIL, diffusers, CLIP); insightface and OpenCV
speak BGR. This module is the one place that decodes and checks user images;
the conversion to BGR happens right before insightface is called, and every
image handed back to callers is RGB again.

Only uint8 arrays are accepted: a float array could mean [0, 1] or [0, 255]
and guessing wrong silently ruins the embedding. 16-bit greyscale images (PNG)
are scaled from 0..65535 to 0..255 (Pillow's own conversion would clip them to white).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from .errors import FaceImageError

if TYPE_CHECKING:  # Pillow is imported only where an image is decoded
    from PIL import Image as _PILImage

ImageLike = Union[str, os.PathLike, "_PILImage.Image", np.ndarray]

#: Smallest shorter side (pixels) of an image given for face detection.
MIN_DETECT_SIDE = 64


def load_image(image: ImageLike, *, min_side: int = 1) -> np.ndarray:
    """Return ``image`` as a C-contiguous (H, W, 3) RGB uint8 array.

    Accepts a file path (any format Pillow reads; EXIF orientation applied),
    a ``PIL.Image.Image`` (any mode), or a numpy uint8 array shaped (H, W),
    (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped). Raises
    :class:`FaceImageError` for a missing or unreadable file, an unsupported
    type, dtype or shape, and for an image whose shorter side is below
    ``min_side`` pixels.
    """
    if isinstance(image, (str, os.PathLike)):
        array = _read_file(Path(image))
    elif isinstance(image, np.ndarray):
        array = _from_array(image)
    elif _is_pil(image):
        array = _from_pil(image)
    else:
        raise FaceImageError(
            f"unsupported image type {type(image).__name__}: give a file path, a PIL image "
            "or an RGB uint8 numpy array (H, W, 3)")
    height, width = array.shape[:2]
    if min(height, width) < min_side:
        raise FaceImageError(
            f"{describe(image)} is {width}x{height} pixels; at least {min_side} pixels are needed on "
            "the shorter side (give a larger photo in which the face is clearly visible)")
    return np.ascontiguousarray(array)


def describe(image: ImageLike) -> str:
    """A short name for ``image`` in messages: its path, or its kind and size."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, np.ndarray):
        return f"the {'x'.join(str(d) for d in image.shape)} array"
    if _is_pil(image):
        return f"the {image.size[0]}x{image.size[1]} PIL image"
    return f"the {type(image).__name__}"


def rgb_to_bgr(rgb: np.ndarray) -> np.ndarray:
    """RGB <-> BGR (the same channel flip), as a contiguous copy for OpenCV."""
    return np.ascontiguousarray(rgb[..., ::-1])


def _is_pil(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a runtime dependency
        return False
    return isinstance(obj, Image.Image)


def _read_file(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise FaceImageError(f"image file not found: {path}")
    if not path.is_file():
        raise FaceImageError(f"not an image file (it is a folder or special file): {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here with its path in the message
            im = ImageOps.exif_transpose(im)
            return _from_pil(im)
    except UnidentifiedImageError:
        raise FaceImageError(
            f"cannot read {path}: not an image format Pillow understands "
            "(JPEG, PNG, WebP, BMP, ... expected)") from None
    except Image.DecompressionBombError as exc:
        raise FaceImageError(f"cannot read {path}: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise FaceImageError(f"cannot read {path}: the file is damaged or truncated ({exc})") from None


#: Pillow modes of 16-bit greyscale images (16-bit PNGs open as ``I;16``; older Pillow and
#: TIFF readers give 32-bit ``I`` with the same 0..65535 values).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _from_pil(im) -> np.ndarray:
    try:
        if im.mode in _SIXTEEN_BIT_MODES:
            # Pillow's convert("RGB") clips these to 255 (a white image); scale 0..65535 to 0..255 instead.
            grey = np.asarray(im, dtype=np.float64)
            return _from_array(np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8))
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise FaceImageError(f"cannot decode the PIL image ({exc})") from None


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise FaceImageError(
            f"numpy image must be uint8 RGB with values 0..255, got dtype {array.dtype}; "
            "convert e.g. with (x * 255).round().clip(0, 255).astype(np.uint8)")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    if array.ndim == 3 and array.shape[2] == 4:
        return array[:, :, :3]
    raise FaceImageError(
        f"numpy image must be shaped (H, W), (H, W, 3) RGB or (H, W, 4) RGBA, got {array.shape}")
