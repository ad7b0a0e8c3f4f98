"""What the tools write: drawings (detectron2's Visualizer), COCO-format detection records,
PNG / JSON files written atomically, annotated videos."""
import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer

from detr_d2.engine import SetupError
from detr_d2.checkpoint.io import atomic_write
from detr_d2.utils.inputs import VIDEO_FOURCC

__all__ = ["AtomicVideoWriter", "coco_records", "draw_predictions", "mask_rle", "write_json", "write_png"]


MAX_DRAWING_SIDE = 4096  # larger images are drawn scaled down (matplotlib time and memory)


def drawing_scale(height, width, max_side=MAX_DRAWING_SIDE, scale=1.0):
    """Factor by which a height x width image is drawn: ``scale``, lowered where needed so
    that the longer side is at most ``max_side``."""
    return min(scale, max_side / max(height, width))


def scaled_masks(masks, size):
    """bool masks [N, H, W] resized to ``size`` (height, width) by nearest neighbour."""
    if len(masks) == 0:
        return masks.new_zeros((0, *size))
    return F.interpolate(masks[None].float(), size=size, mode="nearest")[0].to(torch.bool)


def draw_predictions(image_rgb, instances, metadata, max_side=MAX_DRAWING_SIDE, scale=1.0):
    """HWC uint8 RGB image with the boxes of ``instances`` (``pred_boxes`` xyxy absolute
    pixels of ``image_rgb``) labelled "class score%", and their ``pred_masks`` (bool
    [N, H, W] of the image's size) where the model predicts masks.

    The drawing is ``scale`` times the size of ``image_rgb`` (the image enlarged bilinearly:
    on small images, e.g. 128 px, the Visualizer's labels would cover the objects), except
    that a drawing whose longer side would exceed ``max_side`` is scaled down to it
    (detectron2's Visualizer renders through matplotlib: a 12000x9000 image took over a
    minute and 13 GB).
    """
    factor = drawing_scale(*image_rgb.shape[:2], max_side=max_side, scale=scale)
    if factor != 1.0:
        size = (round(image_rgb.shape[1] * factor), round(image_rgb.shape[0] * factor))
        interpolation = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
        image_rgb = cv2.resize(image_rgb, size, interpolation=interpolation)
        scaled = Instances(image_rgb.shape[:2], **instances.get_fields())
        scaled.pred_boxes = instances.pred_boxes.clone()
        scaled.pred_boxes.scale(factor, factor)
        if instances.has("pred_masks"):
            scaled.pred_masks = scaled_masks(instances.pred_masks, image_rgb.shape[:2])
        instances = scaled
    return Visualizer(image_rgb, metadata).draw_instance_predictions(instances).get_image()


def write_png(path, image_rgb):
    """Write an HWC uint8 RGB image as a PNG, atomically."""
    ok, encoded = cv2.imencode(".png", image_rgb[:, :, ::-1])
    if not ok:
        raise OSError(f"cannot encode {path} as PNG")
    atomic_write(path, lambda file: file.write(encoded.tobytes()))


def write_json(path, data):
    """Write ``data`` as JSON, atomically."""
    atomic_write(path, lambda file: json.dump(data, file, indent=1), binary=False)


def _dataset_category_ids(metadata):
    """contiguous class index -> the dataset's category id, or None if the metadata has
    no ``thing_dataset_id_to_contiguous_id`` (then the index is the id); a panoptic
    dataset's stuff classes from its ``stuff_dataset_id_to_contiguous_id``."""
    mapping = metadata.get("thing_dataset_id_to_contiguous_id")
    if not mapping:
        return None
    mapping = {**metadata.get("stuff_dataset_id_to_contiguous_id", {}), **mapping}
    return {index: dataset_id for dataset_id, index in mapping.items()}


def coco_records(instances, file_name, metadata, **extra):
    """COCO results records of ``instances`` of the image ``file_name``.

    Each: {"file_name", "category_id" (the dataset's id, see ``_dataset_category_ids``),
    "category_name", "bbox": [x, y, w, h] (COCO xywh, absolute pixels; converted from the
    xyxy ``pred_boxes``), "score", **extra} (e.g. ``frame=`` for video frames), with
    ``pred_masks`` also "segmentation": the mask as COCO compressed RLE (counts a string)."""
    category_ids = _dataset_category_ids(metadata)
    names = metadata.get("thing_classes")
    records = []
    for (x0, y0, x1, y1), score, label in zip(instances.pred_boxes.tensor.tolist(),
                                              instances.scores.tolist(), instances.pred_classes.tolist()):
        records.append({"file_name": file_name,
                        "category_id": category_ids[label] if category_ids else label,
                        "category_name": names[label] if names else str(label),
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score, **extra})
    if instances.has("pred_masks"):
        for record, mask in zip(records, instances.pred_masks.cpu().numpy()):
            record["segmentation"] = mask_rle(mask)
    return records


def mask_rle(mask):
    """COCO compressed RLE {"size": [H, W], "counts": str} of a bool mask [H, W]."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


class AtomicVideoWriter:
    """A cv2.VideoWriter for ``path`` (codec from its extension, see VIDEO_FOURCC) that
    writes to a temporary file beside it and renames it to ``path`` on ``close()``; frames
    are HWC uint8 RGB of one size, the writer is opened at the first frame."""

    def __init__(self, path, fps):
        self.path = path
        stem, extension = os.path.splitext(path)
        self.temporary_path = os.path.join(os.path.dirname(path),
                                           f".{os.path.basename(stem)}.{os.getpid()}.tmp{extension}")
        self.codec = VIDEO_FOURCC[extension.lower()]
        self.fps = fps
        self.writer = None

    def write(self, frame_rgb):
        if self.writer is None:
            height, width = frame_rgb.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*self.codec)
            self.writer = cv2.VideoWriter(self.temporary_path, fourcc, self.fps, (width, height))
            if not self.writer.isOpened():
                raise SetupError(f"OpenCV cannot write the video {self.path} with codec {self.codec}")
        self.writer.write(frame_rgb[:, :, ::-1].copy())

    def close(self):
        """Finish the file and move it into place (nothing is written without a frame)."""
        if self.writer is not None:
            self.writer.release()
            os.replace(self.temporary_path, self.path)

    def discard(self):
        """Drop the partial video."""
        if self.writer is not None:
            self.writer.release()
        if os.path.exists(self.temporary_path):
            os.remove(self.temporary_path)
