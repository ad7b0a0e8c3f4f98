"""What the tools write for a MODEL.DETR.PANOPTIC_ON model's ``panoptic_seg``: the drawing
(detectron2's ``Visualizer.draw_panoptic_seg``), the segment-id PNG and the segments
record of the COCO-panoptic format, written atomically.

``panoptic_seg`` is (seg int [H, W] of segment ids, 0 = no segment; segments_info list of
{"id", "category_id" (contiguous), "isthing", "score", "area"}), see ``modeling.panoptic``.
"""
import cv2
import numpy as np
import torch.nn.functional as F
from detectron2.data import Metadata
from detectron2.utils.visualizer import Visualizer

from detr_d2.utils.outputs import drawing_scale, write_png

__all__ = ["draw_panoptic", "draw_panoptic_frame", "panoptic_drawing_metadata", "panoptic_record",
           "segment_id_rgb", "write_segment_id_png"]


def panoptic_drawing_metadata(metadata, num_classes):
    """``metadata`` when it names the model's ``num_classes`` classes as detectron2's
    standard panoptic metadata does (``thing_classes`` and ``stuff_classes`` both indexed
    by contiguous id); otherwise names "class <i>" (colours then drawn at random)."""
    names = [metadata.get(key, None) for key in ("thing_classes", "stuff_classes")]
    if all(listed is not None and len(listed) == num_classes for listed in names):
        return metadata
    generic = [f"class {index}" for index in range(num_classes)]
    return Metadata(name="panoptic_without_names", thing_classes=generic, stuff_classes=generic)


def _scaled_segmentation(seg, size):
    """Segment ids [H, W] resized to ``size`` (height, width) by nearest neighbour."""
    if tuple(seg.shape) == tuple(size):
        return seg
    return F.interpolate(seg[None, None].double(), size=size, mode="nearest")[0, 0].to(seg.dtype)


def draw_panoptic(image_rgb, panoptic_seg, metadata, scale=1.0):
    """HWC uint8 RGB drawing of ``panoptic_seg`` (of the image's size) over ``image_rgb``:
    stuff segments labelled with their class, thing segments with "class score%" and a
    jittered colour (``Visualizer.draw_panoptic_seg``); ``scale`` and the size limit as
    ``outputs.draw_predictions``."""
    seg, segments_info = panoptic_seg
    factor = drawing_scale(*image_rgb.shape[:2], scale=scale)
    if factor != 1.0:
        size = (round(image_rgb.shape[1] * factor), round(image_rgb.shape[0] * factor))
        image_rgb = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR)
    seg = _scaled_segmentation(seg.cpu(), image_rgb.shape[:2])
    segments = [dict(segment) for segment in segments_info]  # the Visualizer writes "area" into them
    return Visualizer(image_rgb, metadata).draw_panoptic_seg(seg, segments).get_image()


def draw_panoptic_frame(visualizer, frame_rgb, panoptic_seg):
    """A video frame's drawing by detectron2's ``VideoVisualizer`` ``visualizer``."""
    seg, segments_info = panoptic_seg
    segments = [dict(segment) for segment in segments_info]
    return visualizer.draw_panoptic_seg_predictions(frame_rgb, seg.cpu(), segments).get_image()


def segment_id_rgb(seg):
    """Segment ids [H, W] -> HWC uint8 RGB with id = R + 256 G + 256^2 B (COCO-panoptic PNG)."""
    ids = seg.cpu().numpy().astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def write_segment_id_png(path, seg):
    """The COCO-panoptic PNG of segment ids [H, W], written atomically."""
    write_png(path, segment_id_rgb(seg))


def _dataset_category_id(metadata, category_id, isthing):
    """The dataset's category id of a contiguous ``category_id`` (the thing or stuff map of
    the metadata), or the contiguous id where the metadata has no such map."""
    key = "thing_dataset_id_to_contiguous_id" if isthing else "stuff_dataset_id_to_contiguous_id"
    mapping = metadata.get(key, None)
    if not mapping:
        return category_id
    return {contiguous: dataset_id for dataset_id, contiguous in mapping.items()}[category_id]


def panoptic_record(panoptic_seg, file_name, png_name, metadata, **extra):
    """The COCO-panoptic annotation record of one image's prediction: {"file_name" (the
    input), "segments_file" (the PNG of ``write_segment_id_png``), "segments_info": per
    segment {"id", "category_id" (the dataset's id), "category_name", "isthing", "score",
    "area"}, **extra}."""
    _, segments_info = panoptic_seg
    names = metadata.get("stuff_classes", None)
    segments = [{"id": int(s["id"]),
                 "category_id": _dataset_category_id(metadata, s["category_id"], s["isthing"]),
                 "category_name": names[s["category_id"]] if names else str(s["category_id"]),
                 "isthing": bool(s["isthing"]), "score": float(s["score"]), "area": int(s["area"])}
                for s in segments_info]
    return {"file_name": file_name, "segments_file": png_name, "segments_info": segments, **extra}
