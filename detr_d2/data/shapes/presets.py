"""Named class lists of the shapes datasets and the default split sizes."""

PRESETS = {
    "pretrain": ("circle", "ellipse", "rectangle", "triangle", "pentagon", "hexagon"),
    "custom": ("star", "cross"),
}
DEFAULT_SPLITS = {"train": 2000, "val": 200}
