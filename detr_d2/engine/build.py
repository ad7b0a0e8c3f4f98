"""The model of a config as training, evaluation and the tools run it: detectron2's own
``build_model``, which builds detr_d2's meta-architectures with ``detr_d2.acceleration``
applied and switched by MODEL.DETR.FAST_PATHS (``detr_d2.meta_architectures``), and
'Detr' with MODEL.DETR.NUM_QUERY_GROUPS != 1 as 'GroupDetr'."""
from detectron2.modeling import build_model

__all__ = ["build_model"]
