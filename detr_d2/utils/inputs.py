"""Input files of the tools: images and videos; which files an ``--input`` list names and
the output names come from ``detr_d2_deploy.inputs`` (shared with tools/predict_onnx.py)."""
import cv2
from detectron2.data.detection_utils import convert_PIL_to_numpy
from PIL import Image

from detr_d2.data.image_io import BadImageError, read_image
from detr_d2_deploy.inputs import (
    IMAGE_EXTENSIONS,
    InputFailure,
    OutputPaths,
    batched,
    expand_inputs,
    is_video,
)

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_FOURCC", "InputFailure", "OutputPaths", "UnreadableInput",
           "batched", "expand_inputs", "frame_in_format", "is_video", "open_video", "read_frames",
           "read_input_image"]

# each of detr_d2_deploy.inputs.VIDEO_EXTENSIONS -> the codec its output is written with
VIDEO_FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}


class UnreadableInput(Exception):
    """An input file that cannot be decoded; the message is the reason."""


def read_input_image(path, image_format):
    """HWC uint8 image of ``path`` in ``image_format`` (e.g. "RGB"), read with
    ``image_io.read_image`` (EXIF orientation applied; grayscale, palette, RGBA and 16-bit
    files converted); raises UnreadableInput with the reason."""
    try:
        return read_image(path, format=image_format)
    except BadImageError as error:
        raise UnreadableInput(error.reason) from error


def open_video(path):
    """(cv2.VideoCapture, frames per second, frame count or 0 if unknown) of a video file;
    raises UnreadableInput if it cannot be opened or has no frame size."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened() or not capture.get(cv2.CAP_PROP_FRAME_WIDTH):
        capture.release()
        raise UnreadableInput("cannot open the video (missing, corrupt, or an unsupported codec)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    return capture, fps, max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)


def read_frames(capture):
    """The frames of an open video, each an HWC uint8 BGR array."""
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def frame_in_format(frame_bgr, image_format):
    """A BGR video frame converted to ``image_format`` as ``read_image`` would give it."""
    if image_format == "BGR":
        return frame_bgr
    return convert_PIL_to_numpy(Image.fromarray(frame_bgr[:, :, ::-1]), image_format)
