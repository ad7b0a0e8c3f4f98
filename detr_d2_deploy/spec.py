"""``DIR/export.json``: what an exported DETR takes and returns, and how to prepare images.

Written by ``tools/export_model.py`` (``detr_d2.export``), read by the predictor here. The
names of files, inputs and outputs below are the interface between the two.
"""
import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from detr_d2_deploy.errors import DeployError

__all__ = ["BOXES", "CLASSIFICATIONS", "EXPORT_FILE", "FORMAT_VERSION", "IMAGES", "IMAGE_SIZES", "LOGITS", "MASKS",
           "MODEL_FILES", "SIGMOID_TOPK", "SOFTMAX", "ExportSpec", "read_spec"]

EXPORT_FILE = "export.json"
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
IMAGES, IMAGE_SIZES = "images", "image_sizes"  # graph inputs
LOGITS, BOXES, MASKS = "logits", "boxes", "mask_logits"  # graph outputs (MASKS with MODEL.MASK_ON)
FORMAT_VERSION = 2  # 2: postprocessing "classification" (and "topk"); a version-1 file is a softmax export
READABLE_FORMAT_VERSIONS = (1, 2)
SOFTMAX, SIGMOID_TOPK = "softmax", "sigmoid_topk"  # postprocessing "classification"
CLASSIFICATIONS = (SOFTMAX, SIGMOID_TOPK)

PADDING = ("each image at the top-left of the batch tensor, the rest (bottom/right) zero after "
           "normalisation; the batch is as large as its largest image")
SCORES = ("softmax over the K+1 logits of a query; its score and label are the largest probability "
          "among the K object classes and that class (the last column, no object, is dropped); one "
          "detection per query, in query order")
TOPK_SCORES = ("sigmoid of each of the Q x K logits; the topk (query, class) pairs of highest probability, "
               "best first, are the detections (score: the probability, label: the class, box: the query's; "
               "a query may appear with several classes)")
BOX_CONVERSION = ("boxes (cx, cy, w, h) normalised by the unpadded network-input size -> (x0, y0, x1, y1) "
                  "times the original image's width/height, clipped to it")
MASK_CONVERSION = ("mask logits [Q, h2, w2] upsampled bilinearly (half-pixel centres) to the padded batch's "
                   "(H, W), sigmoid > mask_threshold, cropped to the image's unpadded size, resized to the "
                   "original size by nearest neighbour (source index floor(dst * in / out))")


@dataclass(frozen=True)
class ExportSpec:
    """What ``export.json`` holds about one exported model.

    ``channel_order``: "RGB" or "BGR", the order of ``pixel_mean``/``pixel_std`` and of the
    graph's image channels; ``shortest_edge`` / ``max_size``: detectron2's test-time
    ResizeShortestEdge (0: no resize); ``class_names`` / ``category_ids``: per contiguous
    class index, the dataset's name and id (None when the config's datasets had none);
    ``score_threshold``: tools/demo.py's default ``--confidence-threshold``;
    ``mask_threshold``: MODEL.MASK_THRESHOLD of a MODEL.MASK_ON export (its graph also
    returns mask logits), None for a box-only export; ``classification``: SOFTMAX (logits
    [Q, K+1], the last column "no object"; DETR) or SIGMOID_TOPK (logits [Q, K] of K
    independent sigmoids, the ``topk`` best (query, class) pairs kept; Deformable DETR, DINO).
    """

    format: str
    channel_order: str
    pixel_mean: Tuple[float, float, float]
    pixel_std: Tuple[float, float, float]
    shortest_edge: int
    max_size: int
    num_queries: int
    num_classes: int
    class_names: Optional[Tuple[str, ...]]
    category_ids: Optional[Tuple[int, ...]]
    score_threshold: float
    mask_threshold: Optional[float] = None
    classification: str = SOFTMAX
    topk: Optional[int] = None

    def __post_init__(self):
        if self.classification not in CLASSIFICATIONS:
            raise ValueError(f"classification {self.classification!r} is not one of {', '.join(CLASSIFICATIONS)}")
        if (self.classification == SIGMOID_TOPK) != (self.topk is not None):
            raise ValueError(f"topk {self.topk!r} goes with classification {SIGMOID_TOPK!r} and only with it")

    @property
    def model_file(self):
        return MODEL_FILES[self.format]

    @property
    def num_logits(self):
        """Logits per query: K, or K+1 with the "no object" column of a softmax export."""
        return self.num_classes + (1 if self.classification == SOFTMAX else 0)

    @property
    def has_masks(self):
        return self.mask_threshold is not None

    @property
    def output_names(self):
        return [LOGITS, BOXES, MASKS] if self.has_masks else [LOGITS, BOXES]

    def _inputs(self):
        return [
            {"name": IMAGES, "dtype": "float32", "shape": ["batch", 3, "height", "width"],
             "description": f"images resized as 'preprocessing' says, channels {self.channel_order}, "
                            f"(pixel - pixel_mean) / pixel_std, padded: {PADDING}"},
            {"name": IMAGE_SIZES, "dtype": "int64", "shape": ["batch", 2],
             "description": "unpadded (height, width) of each image in the batch; the padding mask is "
                            "computed from it inside the graph"},
        ]

    def _outputs(self):
        return self._box_outputs() + (self._mask_outputs() if self.has_masks else [])

    def _mask_outputs(self):
        return [{"name": MASKS, "dtype": "float32", "shape": ["batch", self.num_queries, "mask_height", "mask_width"],
                 "description": "mask logits per query at the backbone's res2 size of the padded batch "
                                "(about height/4 x width/4), no sigmoid"}]

    def _box_outputs(self):
        return [
            {"name": LOGITS, "dtype": "float32", "shape": ["batch", self.num_queries, self.num_logits],
             "description": ("class logits per query, the last column is 'no object'" if self.classification == SOFTMAX
                             else "class logits per query, one independent sigmoid per class")},
            {"name": BOXES, "dtype": "float32", "shape": ["batch", self.num_queries, 4],
             "description": "boxes per query: (cx, cy, w, h) normalised by the image's unpadded size "
                            "(image_sizes), in [0, 1]"},
        ]

    def to_json(self, **extra):
        """The ``export.json`` object, with ``extra`` top-level entries (e.g. "source")."""
        return {
            "format_version": FORMAT_VERSION,
            "format": self.format,
            "model_file": self.model_file,
            "inputs": self._inputs(),
            "outputs": self._outputs(),
            "preprocessing": {
                "channel_order": self.channel_order,
                "pixel_range": "0-255 (uint8 pixels as float)",
                "pixel_mean": list(self.pixel_mean),
                "pixel_std": list(self.pixel_std),
                "resize": {"rule": "ResizeShortestEdge: scale so the shorter side is shortest_edge, unless the "
                                   "longer side would exceed max_size (then that side is max_size); sides "
                                   "rounded to the nearest integer; shortest_edge 0: no resize",
                           "shortest_edge": self.shortest_edge, "max_size": self.max_size,
                           "interpolation": "bilinear (Pillow Image.resize on uint8)"},
                "padding": PADDING,
            },
            "postprocessing": {"classification": self.classification,
                               **({"topk": self.topk} if self.classification == SIGMOID_TOPK else {}),
                               "scores": SCORES if self.classification == SOFTMAX else TOPK_SCORES,
                               "boxes": BOX_CONVERSION,
                               **({"masks": MASK_CONVERSION, "mask_threshold": self.mask_threshold}
                                  if self.has_masks else {})},
            "classes": {"num_classes": self.num_classes,
                        "names": list(self.class_names) if self.class_names else None,
                        "category_ids": list(self.category_ids) if self.category_ids else None},
            "score_threshold": self.score_threshold,
            **extra,
        }

    @classmethod
    def from_json(cls, data):
        """The spec of an ``export.json`` object; KeyError/TypeError/ValueError if malformed."""
        preprocessing, resize, classes = data["preprocessing"], data["preprocessing"]["resize"], data["classes"]
        postprocessing = data["postprocessing"]
        topk = postprocessing.get("topk")
        logits_shape = next(o["shape"] for o in data["outputs"] if o["name"] == LOGITS)
        return cls(format=data["format"], channel_order=preprocessing["channel_order"],
                   pixel_mean=tuple(map(float, preprocessing["pixel_mean"])),
                   pixel_std=tuple(map(float, preprocessing["pixel_std"])),
                   shortest_edge=int(resize["shortest_edge"]), max_size=int(resize["max_size"]),
                   num_queries=int(logits_shape[1]), num_classes=int(classes["num_classes"]),
                   class_names=tuple(classes["names"]) if classes["names"] else None,
                   category_ids=tuple(map(int, classes["category_ids"])) if classes["category_ids"] else None,
                   score_threshold=float(data["score_threshold"]),
                   mask_threshold=postprocessing.get("mask_threshold"),
                   classification=postprocessing.get("classification", SOFTMAX),
                   topk=None if topk is None else int(topk))


def read_spec(model_dir):
    """The ``ExportSpec`` of ``model_dir/export.json``; DeployError naming the file if it is
    missing, is not JSON, or lacks a key."""
    path = os.path.join(model_dir, EXPORT_FILE)
    if not os.path.isfile(path):
        raise DeployError(f"{path} does not exist: --model-dir must be a folder written by "
                          "tools/export_model.py")
    try:
        with open(path) as file:
            data = json.load(file)
        if data.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"format_version {data.get('format_version')!r}, this predictor reads "
                             f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))}")
        return ExportSpec.from_json(data)
    except (ValueError, KeyError, TypeError, StopIteration) as error:
        raise DeployError(f"{path} is not a valid export description ({type(error).__name__}: {error}); "
                          "export the model again with tools/export_model.py") from error
