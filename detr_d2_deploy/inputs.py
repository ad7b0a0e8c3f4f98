"""Which files an ``--input`` list names, and output names that collide with nothing.

Shared by tools/demo.py (through ``detr_d2.utils.inputs``) and tools/predict_onnx.py, so
both read the same files in the same order.
"""
import glob
import itertools
import os
from dataclasses import dataclass

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "InputFailure", "OutputPaths", "batched", "expand_inputs",
           "is_video"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi")
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class InputFailure:
    """An input that was skipped: its path (or pattern) and why."""

    path: str
    reason: str


def _extension(path):
    return os.path.splitext(path)[1].lower()


def is_video(path):
    """Whether ``path`` names a video by its extension (VIDEO_EXTENSIONS)."""
    return _extension(path) in VIDEO_EXTENSIONS


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
