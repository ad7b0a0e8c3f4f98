"""DETR targets of a COCO-panoptic record: every segment, thing or stuff, one target.

The panoptic PNG (id = R + 256·G + 256²·B, 0 = void) is read, its listed segments are
renumbered 1..N (0 = void: id 0 and any id the record does not list), and that index map
goes through the image's transforms as a segmentation (nearest-neighbour resize, flip,
crop: detectron2's ``apply_segmentation``), so image and ids stay aligned. Each segment
then gives a target: its contiguous ``category_id`` as the class, its pixels as the mask,
and the tight box around them (XYXY absolute, x1 = last column + 1 as detectron2's
``BitMasks.get_bounding_boxes``; the reference's ``masks_to_boxes`` gives the last
column itself). A segment the crop (or the resize) leaves without pixels is dropped.

Crowd segments stay targets, as in the reference's panoptic training (its
``CocoPanoptic`` keeps them; ``iscrowd`` is carried but no loss reads it). Void pixels
belong to no target.
"""
import numpy as np
import torch
from detectron2.structures import BitMasks, Boxes, Instances

from detr_d2.data.panoptic_validation import PanopticDataError, check_segment_ids, read_panoptic_png

__all__ = ["masks_to_boxes_xyxy", "panoptic_index_map", "panoptic_instances"]


def panoptic_index_map(record, image_shape):
    """The record's PNG as an index map [H, W]: segment k of ``segments_info`` is k + 1, void 0.

    uint8 when there are fewer than 255 segments (transformed like the instance masks),
    float32 otherwise (exact integers; detectron2 resizes non-uint8 maps with torch's
    nearest interpolation, which has no integer kernel).

    Args:
        record (dict): with "pan_seg_file_name", "segments_info", "image_id".
        image_shape (tuple[int, int]): (H, W) of the image as read, before transforms.

    Raises:
        PanopticDataError: missing/unreadable PNG, a size other than the image's, a
            listed segment id absent from the PNG.
    """
    png_file = record["pan_seg_file_name"]
    ids = read_panoptic_png(png_file)
    expected = tuple(image_shape)
    if ids.shape != expected:
        raise PanopticDataError(f"panoptic PNG {png_file} is {ids.shape[1]}x{ids.shape[0]} (width x height) but "
                                f"image_id {record.get('image_id')} is {expected[1]}x{expected[0]}; the PNG must "
                                "have the image's size")
    segments = record["segments_info"]
    check_segment_ids(ids, segments, png_file)
    index = np.zeros(ids.shape, dtype=np.uint8 if len(segments) < 255 else np.float32)
    for k, segment in enumerate(segments):
        index[ids == segment["id"]] = k + 1
    return index


def masks_to_boxes_xyxy(masks):
    """Tight XYXY boxes [N, 4] float32 of non-empty bool masks [N, H, W] (x1 = last column + 1)."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    height, width = masks.shape[1:]
    y0 = rows.float().argmax(dim=1)
    y1 = height - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = width - cols.flip(1).float().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def panoptic_instances(segments_info, index_map, with_masks):
    """``Instances`` of every segment still present in the transformed ``index_map``.

    Args:
        segments_info (list[dict]): the record's segments (contiguous ``category_id``),
            segment k at index k + 1 of ``index_map``.
        index_map (ndarray): [H, W] indices after the transforms (0 = void).
        with_masks (bool): also give ``gt_masks`` (BitMasks [N, H, W]).

    Returns:
        Instances of image size (H, W): ``gt_boxes`` (XYXY absolute), ``gt_classes``
        (int64), ``gt_masks`` with ``with_masks``; segments in ``segments_info`` order.
    """
    index = torch.from_numpy(np.ascontiguousarray(index_map).astype(np.int64))
    height, width = index.shape
    masks = index[None] == torch.arange(1, len(segments_info) + 1)[:, None, None]
    keep = masks.flatten(1).any(dim=1)
    masks = masks[keep]
    classes = torch.tensor([int(s["category_id"]) for s in segments_info], dtype=torch.int64)[keep]
    instances = Instances((height, width), gt_boxes=Boxes(masks_to_boxes_xyxy(masks).reshape(-1, 4)),
                          gt_classes=classes)
    if with_masks:
        instances.gt_masks = BitMasks(masks)
    return instances
