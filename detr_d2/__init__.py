"""DETR as a detectron2 plugin. ``import detr_d2`` registers everything it provides."""
from detr_d2 import compat

compat.apply()

from detr_d2 import modeling  # noqa: E402  (registers Detr; needs compat applied first)
from detr_d2.config import add_detr_config  # noqa: E402

__all__ = ["add_detr_config", "modeling"]
