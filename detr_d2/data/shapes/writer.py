"""Writing one split of a shapes dataset: its PNG images and its COCO json.

Every file is written to a temporary name in its folder and then renamed, so an
interrupted run never leaves a half-written file under a final name.
"""
import json
import os
import re

import cv2
import numpy as np
import pycocotools.mask as mask_util

from detr_d2.data.shapes.rendering import render_sample, sample_rng

GENERATOR_VERSION = 2  # 2: annotations carry the "segmentation" of the visible pixels
TEMPORARY_NAME = r"\..+\.\d+\.tmp"  # what write_atomic writes before renaming


def write_atomic(path, data):
    """Write ``data`` (bytes) to ``path`` via a temporary file in the same folder."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def _json_bytes(obj):
    """Deterministic json encoding."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _png_bytes(image_rgb):
    """PNG encoding of an RGB image."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def mask_rle(mask):
    """COCO compressed RLE {"size": [H, W], "counts": str} of a boolean mask [H, W]."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def image_file_name(index):
    """File name of image ``index`` of a split, e.g. ``000042.png``."""
    return f"{index:06d}.png"


def _categories(classes):
    """COCO categories: ids from 1 in the order of ``classes``."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]


def _remove_stale_images(image_dir, expected_names):
    """Delete numbered PNGs in ``image_dir`` that are not in ``expected_names``, and
    temporary files that an interrupted run left behind."""
    for name in os.listdir(image_dir):
        numbered_png = re.fullmatch(r"\d+\.png", name)
        if (numbered_png and name not in expected_names) or re.fullmatch(TEMPORARY_NAME, name):
            os.remove(os.path.join(image_dir, name))


def write_split(output_dir, split, num_images, classes, settings, seed):
    """Render and write the images and COCO json of one split; returns the json path.

    Image ``index`` goes to ``images/<split>/<index:06d>.png`` with image id index + 1;
    COCO ``bbox`` is [x, y, w, h] tight around the object's visible pixels, ``area``
    counts those pixels and ``segmentation`` is their mask as compressed RLE.
    """
    image_dir = os.path.join(output_dir, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = render_sample(sample_rng(seed, split, index, classes), classes, settings)
        file_name = image_file_name(index)
        write_atomic(os.path.join(image_dir, file_name), _png_bytes(image))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name,
                       "width": settings.image_size, "height": settings.image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": obj.class_index + 1, "bbox": obj.bbox_xywh(),
                                "area": obj.area(), "iscrowd": 0, "segmentation": mask_rle(obj.mask)})
    _remove_stale_images(image_dir, {image["file_name"] for image in images})
    coco = {"info": {"description": f"synthetic shapes ({split})", "version": GENERATOR_VERSION},
            "images": images, "annotations": annotations, "categories": _categories(classes)}
    json_path = os.path.join(output_dir, "annotations", f"{split}.json")
    write_atomic(json_path, _json_bytes(coco))
    print(f"[prepare_shapes] {split}: {num_images} images, {len(annotations)} objects -> {json_path}")
    return json_path
