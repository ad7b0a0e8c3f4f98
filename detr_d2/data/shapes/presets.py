"""Named class lists of the shapes datasets and the default split sizes."""

PRESETS = {
    "pretrain": ("circle", "ellipse", "rectangle", "triangle", "pentagon", "hexagon"),
    "custom": ("star", "cross"),
    # things of the COCO-panoptic landscape set (shapes.panoptic), with sky/ground/water stuff
    "panoptic": ("circle", "ellipse", "rectangle", "triangle", "pentagon", "hexagon"),
}
PANOPTIC_PRESETS = ("panoptic",)
DEFAULT_SPLITS = {"train": 2000, "val": 200}
