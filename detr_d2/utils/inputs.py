"""Input files of the tools: files, folders and glob patterns; images and videos; output
names that collide neither with each other nor with the inputs."""
import glob
import itertools
import os
from dataclasses import dataclass

import cv2
from detectron2.data.detection_utils import convert_PIL_to_numpy
from PIL import Image

from detr_d2.data.image_io import BadImageError, read_image

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_FOURCC", "InputFailure", "OutputPaths", "UnreadableInput",
           "batched", "expand_inputs", "frame_in_format", "is_video", "open_video", "read_frames",
           "read_input_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}  # container -> codec the output is written with
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class InputFailure:
    """An input that was skipped: its path (or pattern) and why."""

    path: str
    reason: str


class UnreadableInput(Exception):
    """An input file that cannot be decoded; the message is the reason."""


def _extension(path):
    return os.path.splitext(path)[1].lower()


def is_video(path):
    """Whether ``path`` names a video by its extension (see VIDEO_FOURCC)."""
    return _extension(path) in VIDEO_FOURCC


def _is_media(path):
    return os.path.isfile(path) and (_extension(path) in IMAGE_EXTENSIONS or is_video(path))


def _files_of(pattern):
    """(sorted files named by ``pattern``, reason when there are none).

    A file is itself; a folder gives the images directly inside it; a glob pattern its
    matching image and video files."""
    if os.path.isfile(pattern):
        return [pattern], None
    if os.path.isdir(pattern):
        names = sorted(name for name in os.listdir(pattern) if _extension(name) in IMAGE_EXTENSIONS)
        files = [os.path.join(pattern, name) for name in names]
        files = [path for path in files if os.path.isfile(path)]
        return files, f"folder has no image files ({', '.join(IMAGE_EXTENSIONS)})"
    if any(character in pattern for character in GLOB_CHARACTERS):
        files = sorted(path for path in glob.glob(pattern, recursive=True) if _is_media(path))
        return files, "pattern matches no image or video file"
    return [], "no such file or folder"


def expand_inputs(patterns):
    """(paths, failures): the files named by ``patterns`` (files, folders, glob patterns) in
    the given order without repeats, and an InputFailure for each pattern naming nothing."""
    paths, seen, failures = [], set(), []
    for pattern in patterns:
        files, reason = _files_of(pattern)
        if not files:
            failures.append(InputFailure(pattern, reason))
        for path in files:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                paths.append(path)
    return paths, failures


def batched(iterable, size):
    """Lists of ``size`` consecutive items of ``iterable`` (the last may be shorter)."""
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


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


class OutputPaths:
    """Unique output paths in one folder, named after the inputs: ``<stem><suffix>``, or
    ``<stem>_<n><suffix>`` when that name is taken by an earlier output, by a reserved name,
    or by an input file in the folder (so no input is overwritten)."""

    def __init__(self, folder, inputs=(), reserved=()):
        self.folder = folder
        self._taken = set(reserved)
        folder_real = os.path.realpath(folder)
        for path in inputs:
            if os.path.dirname(os.path.realpath(path)) == folder_real:
                self._taken.add(os.path.basename(path))

    def path_for(self, input_path, suffix):
        """The output path for ``input_path`` with extension ``suffix`` (e.g. ".png")."""
        stem = os.path.splitext(os.path.basename(input_path))[0]
        name, number = stem + suffix, 0
        while name in self._taken:
            number += 1
            name = f"{stem}_{number}{suffix}"
        self._taken.add(name)
        return os.path.join(self.folder, name)
