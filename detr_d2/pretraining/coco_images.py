"""A COCO-json detection dataset held in memory as numpy arrays."""
import contextlib
import io
import os

import numpy as np
from detectron2.data import detection_utils
from pycocotools.coco import COCO


def paths_of_split(dataset_dir, split):
    """(json, image folder) of a split laid out as datasets/prepare_shapes.py writes it."""
    return (os.path.join(dataset_dir, "annotations", f"{split}.json"),
            os.path.join(dataset_dir, "images", split))


def _usable_annotations(annotations):
    """The annotations that are not crowd and whose box has positive width and height."""
    return [a for a in annotations if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]


def _xyxy_boxes(annotations):
    """float32 [n, 4] xyxy absolute-pixel boxes of COCO annotations ([x, y, w, h] boxes)."""
    return np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
                    dtype=np.float32).reshape(-1, 4)


class CocoImages:
    """A COCO-json dataset held in memory.

    ``images[i]``: uint8 array [H, W, 3] in the given image format's channel order (the
    config's INPUT.FORMAT); ``boxes[i]``: float32 [n, 4] xyxy absolute pixels;
    ``labels[i]``: int64 [n] contiguous class indices (0..K-1 in the order of sorted
    category ids, ``category_ids``); ``image_ids[i]``: COCO id; ``coco``: the pycocotools
    COCO of the json. Crowd annotations and empty boxes are left out.
    """

    def __init__(self, json_file, image_root, image_format):
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(json_file)
        self.category_ids = sorted(self.coco.getCatIds())
        index_of = {cat_id: i for i, cat_id in enumerate(self.category_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.image_ids = sorted(self.coco.getImgIds())
        self.images, self.boxes, self.labels = [], [], []
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            self.images.append(detection_utils.read_image(os.path.join(image_root, info["file_name"]),
                                                          format=image_format))
            annotations = _usable_annotations(self.coco.imgToAnns[image_id])
            self.boxes.append(_xyxy_boxes(annotations))
            self.labels.append(np.array([index_of[a["category_id"]] for a in annotations], dtype=np.int64))

    def __len__(self):
        return len(self.images)
