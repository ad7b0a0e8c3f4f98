"""Images as tools/demo.py prepares them for its model, in numpy and Pillow.

``read_image`` reads like ``detr_d2.data.image_io.read_image`` (EXIF orientation applied,
16-bit scaled to 8 bits, every pixel format as 3 channels); ``resized`` is detectron2's
test-time ``ResizeShortestEdge`` (Pillow bilinear on uint8, so the same pixels);
``normalised`` and ``padded_batch`` do what ``Detr.preprocess_image`` does.
"""
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from detr_d2_deploy.errors import UnreadableImage

__all__ = ["network_input_size", "normalised", "padded_batch", "read_image", "resized"]

EXIF_ORIENTATION = 0x0112
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_8_bit(image):
    """``image`` (PIL) as 8 bits per channel: 16/32-bit integers scaled (65535 -> 255), 32-bit
    float taken as 0..1 when its maximum is at most 1, else as 0..255."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8))
    return image


def _upright(image):
    if image.getexif().get(EXIF_ORIENTATION, 1) in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _reason(error):
    if isinstance(error, FileNotFoundError):
        return "file does not exist"
    if isinstance(error, UnidentifiedImageError):
        return "not a decodable image (empty file, or not an image format)"
    if isinstance(error, Image.DecompressionBombError):
        return f"image too large for Pillow's decompression-bomb limit ({error})"
    return f"{type(error).__name__}: {error}"


def read_image(path, channel_order="RGB"):
    """HWC uint8 array of the image file ``path`` with channels in ``channel_order`` ("RGB"
    or "BGR"); raises UnreadableImage with the reason."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(_to_8_bit(_upright(image)).convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(_reason(error)) from error
    return rgb[:, :, ::-1] if channel_order == "BGR" else rgb


def network_input_size(height, width, shortest_edge, max_size):
    """(height, width) after detectron2's ResizeShortestEdge: the shorter side scaled to
    ``shortest_edge`` unless the longer would exceed ``max_size`` (then it is ``max_size``),
    rounded half up; ``shortest_edge`` 0 keeps the size."""
    if shortest_edge == 0:
        return height, width
    scale = shortest_edge * 1.0 / min(height, width)
    new_height, new_width = (shortest_edge * 1.0, scale * width) if height < width else (scale * height,
                                                                                        shortest_edge * 1.0)
    if max(new_height, new_width) > max_size:
        scale = max_size * 1.0 / max(new_height, new_width)
        new_height, new_width = new_height * scale, new_width * scale
    return int(new_height + 0.5), int(new_width + 0.5)


def resized(image, shortest_edge, max_size):
    """HWC uint8 ``image`` at ``network_input_size``, resized bilinearly by Pillow."""
    if shortest_edge == 0:
        return image
    height, width = network_input_size(*image.shape[:2], shortest_edge, max_size)
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR))


def normalised(image, pixel_mean, pixel_std):
    """HWC uint8 -> CHW float32 ``(pixel - pixel_mean) / pixel_std`` per channel."""
    mean = np.asarray(pixel_mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(pixel_std, np.float32).reshape(3, 1, 1)
    return (image.transpose(2, 0, 1).astype(np.float32) - mean) / std


def padded_batch(chw_images):
    """(images float32 [B, 3, H, W], image_sizes int64 [B, 2]): each CHW image at the
    top-left of a zero batch as high and wide as the largest; (h, w) of each."""
    sizes = np.array([image.shape[1:] for image in chw_images], dtype=np.int64)
    batch = np.zeros((len(chw_images), 3, *sizes.max(axis=0)), dtype=np.float32)
    for target, image in zip(batch, chw_images):
        target[:, :image.shape[1], :image.shape[2]] = image
    return batch, sizes
