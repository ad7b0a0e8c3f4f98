"""Fixtures of the training tests: small COCO-layout data and a runner for the real CLI.

The data is laid out as detectron2's builtin COCO datasets expect it (datasets/README.md)
under a temporary $DETECTRON2_DATASETS, so ``coco_2017_train`` / ``coco_2017_val`` name it:
128x128 images with one or two filled rectangles of one class per image (person, bicycle,
car, person, ... by image id; drawn red, green, blue). The json lists all 80 COCO
categories (the builtin names' metadata expects them), so MODEL.DETR.NUM_CLASSES is 80.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import detr_d2  # noqa: F401  (compat fixes before detectron2's data package)
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
TINY_CONFIG = REPO_ROOT / "configs" / "tests" / "tiny.yaml"
IMAGE_SIZE = 128
CLASS_COLOURS = {1: (220, 40, 40), 2: (40, 200, 40), 3: (40, 40, 220)}  # COCO ids 1-3
BACKGROUND = (128, 128, 128)


def _random_boxes(rng, count):
    """``count`` non-overlapping boxes [x, y, w, h] (pixels) of 28-56 px inside the image."""
    boxes = []
    while len(boxes) < count:
        w, h = rng.integers(28, 57, size=2)
        x, y = rng.integers(0, IMAGE_SIZE - w), rng.integers(0, IMAGE_SIZE - h)
        if all(x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y
               for bx, by, bw, bh in boxes):
            boxes.append([int(x), int(y), int(w), int(h)])
    return boxes


def _image_category(image_id):
    """Every object of an image has one class, cycling with the image id (1, 2, 3, 1, ...).

    Images then differ in colour as a whole, and a small DETR trained from scratch tells
    them apart within its first iterations; when two images hold the same classes at
    different places, it first predicts the union of their boxes on both (measured).
    """
    return sorted(CLASS_COLOURS)[(image_id - 1) % len(CLASS_COLOURS)]


def _draw(boxes, category_ids):
    """HxWx3 uint8 image: the background with each box filled in its class colour."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = BACKGROUND
    for (x, y, w, h), category_id in zip(boxes, category_ids):
        image[y:y + h, x:x + w] = CLASS_COLOURS[category_id]
    return image


def write_coco_split(coco_dir, split, num_images, seed):
    """Write ``coco_dir/<split>/*.png`` and ``coco_dir/annotations/instances_<split>.json``."""
    rng = np.random.default_rng(seed)
    (coco_dir / split).mkdir(parents=True)
    (coco_dir / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        boxes = _random_boxes(rng, int(rng.integers(1, 3)))
        category_ids = [_image_category(image_id)] * len(boxes)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(_draw(boxes, category_ids)).save(coco_dir / split / file_name)
        images.append({"id": image_id, "file_name": file_name,
                       "height": IMAGE_SIZE, "width": IMAGE_SIZE})
        for box, category_id in zip(boxes, category_ids):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (coco_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """A $DETECTRON2_DATASETS holding coco/train2017 (2 images) and coco/val2017 (2 images)."""
    root = tmp_path_factory.mktemp("detectron2_datasets")
    write_coco_split(root / "coco", "train2017", num_images=2, seed=0)
    write_coco_split(root / "coco", "val2017", num_images=2, seed=1)
    return root


def subprocess_env(datasets_root):
    """The environment of a training subprocess: the test data as $DETECTRON2_DATASETS.

    One torch thread per process: with any other load on the (2-core) machine, torch's
    default of one thread per core makes OpenMP's waiting threads slow each step several
    times over (measured on busy cores: 7.9 s per tiny step with 2 threads, 0.9 s with 1),
    and these tiny models gain little from a second thread anyway.
    """
    return dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), PYTHONWARNINGS="ignore",
                OMP_NUM_THREADS="1")


def run_python(args, datasets_root, timeout=300):
    """Run ``python ARGS`` from the repository root; the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT,
                          env=subprocess_env(datasets_root), capture_output=True, text=True,
                          timeout=timeout)


def run_train_net(args, datasets_root, timeout=300):
    """Run ``tools/train_net.py ARGS``; the CompletedProcess (text output)."""
    return run_python([TRAIN_NET, *args], datasets_root, timeout)


def read_metrics(output_dir):
    """The rows of ``output_dir/metrics.json`` (one json object per line)."""
    lines = Path(output_dir, "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
