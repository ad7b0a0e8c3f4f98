"""Generated COCO ground truth and detections, for comparing and timing COCO evaluations.

``synthetic_ground_truth`` gives a COCO instances json (as a dict): images of 480-640 px
sides, objects of 4-400 px sides (small, medium and large in COCO's area ranges), some
crowd objects, some images without objects, categories with COCO's non-contiguous ids.
``synthetic_detections`` gives COCO results for it: a jittered, sometimes mislabelled
copy of most objects and random boxes up to a fixed count per image, scores rounded to
3 decimals (as detections often are, so that ties occur). Boxes are XYWH in absolute
pixels; with ``with_masks`` every object and detection also has a "segmentation" (an
ellipse in its box: polygons for objects, compressed RLE for detections).
"""
import numpy as np
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from pycocotools import mask as mask_utils

__all__ = ["synthetic_detections", "synthetic_ground_truth"]

ELLIPSE_VERTICES = 16


def _category_ids(num_categories):
    """The first ``num_categories`` COCO thing-category ids (non-contiguous, 1..90)."""
    ids = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
    if not 1 <= num_categories <= len(ids):
        raise ValueError(f"num_categories must be in 1..{len(ids)}, got {num_categories}")
    return ids[:num_categories]


def _random_boxes(rng, count, height, width):
    """``count`` boxes [x, y, w, h] inside a ``height`` x ``width`` image, sides log-uniform in
    4..400 px (at most the image), float64 [count, 4]."""
    sides = np.exp(rng.uniform(np.log(4), np.log(400), size=(count, 2)))
    sides = np.minimum(sides, [width - 1, height - 1])
    corners = rng.uniform(0, 1, size=(count, 2)) * ([width, height] - sides)
    return np.concatenate([corners, sides], axis=1)


def ellipse_polygon(box):
    """The polygon [x0, y0, x1, y1, ...] of the ellipse inscribed in ``box`` [x, y, w, h]."""
    x, y, w, h = box
    angles = np.linspace(0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)
    points = np.stack([x + w / 2 * (1 + np.cos(angles)), y + h / 2 * (1 + np.sin(angles))], axis=1)
    return [round(float(v), 2) for v in points.ravel()]


def ellipse_rle(box, height, width):
    """Compressed RLE (counts as str, JSON-ready) of the ellipse inscribed in ``box``."""
    rle = mask_utils.merge(mask_utils.frPyObjects([ellipse_polygon(box)], height, width))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _annotation(box, category_id, image_id, annotation_id, iscrowd, with_masks):
    x, y, w, h = (round(float(v), 2) for v in box)
    annotation = {"id": annotation_id, "image_id": image_id, "category_id": category_id,
                  "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": iscrowd}
    if with_masks:
        annotation["segmentation"] = [ellipse_polygon(box)]
    return annotation


def synthetic_ground_truth(num_images, num_categories=80, objects_per_image=7.0, crowd_fraction=0.02,
                           empty_fraction=0.03, with_masks=False, seed=0):
    """A COCO instances json dict of ``num_images`` images (ids 1..N).

    Objects per image: Poisson with mean ``objects_per_image`` (at least 1), except a
    ``empty_fraction`` of images without any; each object is a crowd region with
    probability ``crowd_fraction``; categories uniform over ``num_categories`` COCO ids.
    """
    rng = np.random.default_rng(seed)
    category_ids = _category_ids(num_categories)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        height, width = (int(v) for v in rng.integers(480, 641, size=2))
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": height, "width": width})
        count = 0 if rng.random() < empty_fraction else max(1, int(rng.poisson(objects_per_image)))
        boxes = _random_boxes(rng, count, height, width)
        categories = rng.choice(category_ids, size=count)
        crowd = rng.random(count) < crowd_fraction
        for box, category_id, iscrowd in zip(boxes, categories, crowd):
            annotations.append(_annotation(box, int(category_id), image_id, len(annotations) + 1,
                                           int(iscrowd), with_masks))
    categories = [{"id": i, "name": f"category_{i}", "supercategory": "thing"} for i in category_ids]
    return {"images": images, "annotations": annotations, "categories": categories}


def _jittered(boxes, rng, relative_noise):
    """``boxes`` [n, 4] XYWH with each coordinate moved by N(0, noise x side), sides >= 1."""
    sides = np.repeat(boxes[:, 2:], 2, axis=1)[:, [0, 2, 1, 3]]
    moved = boxes + rng.normal(0, relative_noise, size=boxes.shape) * sides
    moved[:, 2:] = np.maximum(moved[:, 2:], 1.0)
    return moved


def _image_detections(rng, objects, category_ids, per_image, height, width):
    """(boxes [per_image, 4], category ids, scores) for one image's ``objects`` annotations."""
    kept = [a for a in objects if not a["iscrowd"] and rng.random() < 0.85][:per_image]
    hits = _jittered(np.array([a["bbox"] for a in kept]).reshape(-1, 4), rng, 0.08)
    hit_categories = [a["category_id"] if rng.random() < 0.9 else int(rng.choice(category_ids)) for a in kept]
    misses = _random_boxes(rng, per_image - len(kept), height, width)
    boxes = np.concatenate([hits, misses])
    categories = hit_categories + [int(c) for c in rng.choice(category_ids, size=len(misses))]
    scores = np.concatenate([rng.uniform(0.3, 1.0, len(kept)), rng.uniform(0.0, 0.6, len(misses))])
    return boxes, categories, np.round(scores, 3)


def synthetic_detections(ground_truth, per_image=100, with_masks=False, seed=1):
    """COCO results (list of {"image_id", "category_id", "bbox", "score"[, "segmentation"]})
    with ``per_image`` detections on every image of ``ground_truth``."""
    rng = np.random.default_rng(seed)
    category_ids = [c["id"] for c in ground_truth["categories"]]
    objects_of = {image["id"]: [] for image in ground_truth["images"]}
    for annotation in ground_truth["annotations"]:
        objects_of[annotation["image_id"]].append(annotation)
    results = []
    for image in ground_truth["images"]:
        boxes, categories, scores = _image_detections(rng, objects_of[image["id"]], category_ids, per_image,
                                                      image["height"], image["width"])
        for box, category_id, score in zip(boxes.tolist(), categories, scores.tolist()):
            result = {"image_id": image["id"], "category_id": category_id,
                      "bbox": [round(v, 2) for v in box], "score": score}
            if with_masks:
                result["segmentation"] = ellipse_rle(box, image["height"], image["width"])
            results.append(result)
    return results
