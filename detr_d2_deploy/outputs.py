"""What tools/predict_onnx.py writes: predictions.json records as tools/demo.py writes them,
and drawings of the detections (with OpenCV, when it is installed)."""
import json

import numpy as np

from detr_d2_deploy.errors import DeployError
from detr_d2_deploy.files import atomic_write

try:
    import cv2
except ImportError:  # drawings are optional: predictions.json needs only numpy
    cv2 = None

__all__ = ["can_draw", "coco_records", "draw_detections", "mask_rle", "write_json", "write_png"]

BOX_THICKNESS = 2
FONT_SCALE = 0.5
MASK_OPACITY = 0.5


def coco_records(detections, file_name, spec):
    """COCO results records of one image's ``detections``, as tools/demo.py writes them.

    Each: {"file_name", "category_id" (the dataset's id from ``spec.category_ids``, else the
    class index), "category_name" (``spec.class_names``, else the index as text), "bbox":
    [x, y, w, h] in pixels of the original image, "score"}, with masks (MODEL.MASK_ON
    exports) also "segmentation": the mask as COCO compressed RLE (counts a string)."""
    records = []
    for (x0, y0, x1, y1), score, label in zip(detections.boxes.tolist(), detections.scores.tolist(),
                                              detections.labels.tolist()):
        records.append({"file_name": file_name,
                        "category_id": spec.category_ids[label] if spec.category_ids else label,
                        "category_name": spec.class_names[label] if spec.class_names else str(label),
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    if detections.masks is not None:
        for record, mask in zip(records, detections.masks):
            record["segmentation"] = mask_rle(mask)
    return records


def mask_rle(mask):
    """COCO compressed RLE {"size": [H, W], "counts": str} of a bool mask [H, W] (pycocotools,
    which needs numpy only; imported here so that box-only exports do not need it)."""
    try:
        from pycocotools import mask as mask_util
    except ImportError as error:
        raise DeployError("Writing masks into predictions.json needs pycocotools: pip install pycocotools") from error
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_json(path, data):
    """Write ``data`` as JSON, atomically."""
    atomic_write(path, lambda file: json.dump(data, file, indent=1), binary=False)


def can_draw():
    """Whether OpenCV is importable (drawings need it)."""
    return cv2 is not None


def _class_colour(label):
    """A distinct BGR colour per class index."""
    rng = np.random.default_rng(label)
    return tuple(int(c) for c in rng.integers(64, 256, size=3))


def _blend_masks(drawing, masks, labels):
    """Tint each mask's pixels halfway to its class colour, in place."""
    for mask, label in zip(masks, labels.tolist()):
        drawing[mask] = (drawing[mask] * (1 - MASK_OPACITY) + np.array(_class_colour(label)) * MASK_OPACITY)


def draw_detections(image_bgr, detections, spec):
    """A copy of the HWC uint8 BGR image with each mask (if any) tinted and each box and
    "name score%" drawn."""
    drawing = np.ascontiguousarray(image_bgr).copy()
    if detections.masks is not None:
        _blend_masks(drawing, detections.masks, detections.labels)
    for (x0, y0, x1, y1), score, label in zip(detections.boxes.round().astype(int).tolist(),
                                              detections.scores.tolist(), detections.labels.tolist()):
        colour = _class_colour(label)
        name = spec.class_names[label] if spec.class_names else str(label)
        cv2.rectangle(drawing, (x0, y0), (x1, y1), colour, BOX_THICKNESS)
        cv2.putText(drawing, f"{name} {score:.0%}", (x0 + 2, max(y0 - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX,
                    FONT_SCALE, colour, 1, cv2.LINE_AA)
    return drawing


def write_png(path, image_bgr):
    """Write an HWC uint8 BGR image as a PNG, atomically."""
    ok, encoded = cv2.imencode(".png", image_bgr)
    if not ok:
        raise OSError(f"cannot encode {path} as PNG")
    atomic_write(path, lambda file: file.write(encoded.tobytes()))
