"""Reading image files for training, evaluation and the tools, whatever their pixel format.

``read_image`` gives what detectron2's ``detection_utils.read_image`` gives (HWC uint8 in
the requested format, EXIF orientation applied so that pixels are in the frame the
annotations use), and in addition:

* 16-bit and 32-bit integer images (Pillow modes "I;16", "I;16B", "I;16L", "I") are
  scaled to 8 bits (65535 -> 255) instead of being clipped at 255 (which turns most of a
  16-bit image white); 32-bit float images ("F") are taken as 0..1 when their maximum is
  at most 1, else as 0..255;
* grayscale, palette, RGBA/LA (alpha dropped), CMYK and 1-bit images become 3 channels
  for "RGB"/"BGR", as Pillow converts them;
* any failure (missing, empty or non-image file, truncated data, an image too large for
  Pillow's decompression-bomb limit) raises ``BadImageError`` naming the file and why.
"""
import numpy as np
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps, UnidentifiedImageError

from detr_d2.errors import SetupError

__all__ = ["BadImageError", "ImageNotFoundError", "read_image", "to_8_bit"]

EXIF_ORIENTATION = 0x0112
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImageError(SetupError, OSError):
    """An image file that cannot be used; ``reason`` says why (the message names the file)."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message


class ImageNotFoundError(BadImageError, FileNotFoundError):
    """An image file that does not exist."""


def to_8_bit(image):
    """``image`` (PIL) as an 8-bit image: high-bit-depth modes scaled, others unchanged."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8))
    return image


def _upright(image):
    """``image`` turned as its EXIF orientation says (no copy when there is nothing to do)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _to_numpy(image, format):
    """HWC uint8 array of ``image`` in ``format``; an RGB image is not copied by Pillow first
    (for a 12000x9000 photo that copy is 430 MB)."""
    if image.mode == "RGB" and format in ("RGB", "BGR"):
        array = np.asarray(image)
        return array[:, :, ::-1] if format == "BGR" else array
    return convert_PIL_to_numpy(image, format)


def _reason(error):
    """Why a file could not be read, for the user."""
    if isinstance(error, FileNotFoundError):
        return "file does not exist"
    if isinstance(error, UnidentifiedImageError):
        return "not a decodable image (empty file, or not an image format)"
    if isinstance(error, Image.DecompressionBombError):
        return f"image too large for Pillow's decompression-bomb limit ({error})"
    return f"{type(error).__name__}: {error}"


def read_image(file_name, format=None):
    """HWC uint8 array of ``file_name`` in ``format`` ("RGB", "BGR", "L", ... as detectron2).

    Raises:
        BadImageError (ImageNotFoundError if the file does not exist), message
        "Cannot read image <file>: <reason>".
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            return _to_numpy(to_8_bit(_upright(image)), format)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        error_class = ImageNotFoundError if isinstance(error, FileNotFoundError) else BadImageError
        reason = _reason(error)
        raise error_class(f"Cannot read image {file_name}: {reason}", reason) from error
