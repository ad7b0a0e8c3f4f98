"""COCO box AP of the dense head (pycocotools' COCOeval, bbox) on an in-memory dataset."""
import contextlib
import io

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_d2.pretraining.batches import normalized_batch
from detr_d2.pretraining.decoding import decode_detections

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def class_agnostic_coco(coco):
    """A copy of a pycocotools COCO whose annotations all have category 1 ("object")."""
    dataset = dict(coco.dataset)
    dataset["categories"] = [{"id": 1, "name": "object", "supercategory": "object"}]
    dataset["annotations"] = [dict(a, category_id=1) for a in coco.dataset["annotations"]]
    agnostic = COCO()
    agnostic.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        agnostic.createIndex()
    return agnostic


def _coco_results(image_id, boxes, scores, channels, category_ids, class_agnostic):
    """COCO result dicts ([x, y, w, h] pixel boxes) of one image's decoded detections;
    heatmap channel c is category ``category_ids[c]``, or 1 when class-agnostic."""
    return [{"image_id": image_id, "category_id": 1 if class_agnostic else category_ids[channel],
             "score": score, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
            for box, score, channel in zip(boxes.tolist(), scores.tolist(), channels.tolist())]


@torch.no_grad()
def dense_head_detections(model, data, pixel_mean, pixel_std, class_agnostic, top_k, batch_size=32):
    """COCO result dicts of a ``DenseDetector`` on every image of a ``CocoImages``
    (evaluated in eval mode; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    detections = []
    for start in range(0, len(data), batch_size):
        images = data.images[start:start + batch_size]
        batch = normalized_batch(images, pixel_mean, pixel_std, model.stride)
        heatmap_logits, box_map = model(batch)
        sizes = [image.shape[:2] for image in images]
        for image_id, (boxes, scores, channels) in zip(
                data.image_ids[start:start + batch_size],
                decode_detections(heatmap_logits, box_map, sizes, model.stride, top_k)):
            detections += _coco_results(image_id, boxes, scores, channels, data.category_ids, class_agnostic)
    model.train(was_training)
    return detections


def coco_box_ap(gt_coco, detections):
    """(stats {"AP", "AP50", "AP75", "APs", "APm", "APl"}, the "Average Precision/Recall"
    summary lines) of COCO result dicts against a ground-truth COCO."""
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}, "no detections"
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        dt_coco = gt_coco.loadRes(detections)
        evaluator = COCOeval(gt_coco, dt_coco, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(evaluator.stats[i]) for i, name in enumerate(AP_NAMES)}
    lines = [line for line in summary.getvalue().splitlines() if "Average" in line]
    return stats, "\n".join(lines)


def evaluate(model, data, pixel_mean, pixel_std, class_agnostic, top_k, batch_size=32, gt_coco=None):
    """COCO bbox AP of the dense head on ``data`` against ``gt_coco`` (default: the data's
    own COCO); returns (stats dict, summary text)."""
    detections = dense_head_detections(model, data, pixel_mean, pixel_std, class_agnostic, top_k, batch_size)
    return coco_box_ap(gt_coco or data.coco, detections)
