"""DETR's model parts, plain; importing this registers the ``Detr``, ``GroupDetr``,
``DeformableDetr`` and ``Dino`` meta-architectures and the tiny CNN backbone. Faster equivalents: ``detr_d2.acceleration``."""
from detr_d2.modeling.backbone import MaskedBackbone
from detr_d2.modeling.criterion import SetCriterion
from detr_d2.modeling.deformable_detr import DeformableDetr
from detr_d2.modeling.detr import Detr
from detr_d2.modeling.dino import Dino
from detr_d2.modeling.matcher import HungarianMatcher
from detr_d2.modeling.panoptic import PanopticPostProcess, panoptic_segmentation
from detr_d2.modeling.query_groups import GroupDetr
from detr_d2.modeling.tiny_backbone import TinyCNN  # noqa: F401  (registers build_tiny_cnn_backbone)
from detr_d2.modeling.transformer import Transformer

__all__ = ["DeformableDetr", "Detr", "Dino", "GroupDetr", "HungarianMatcher", "MaskedBackbone", "PanopticPostProcess", "SetCriterion",
           "Transformer", "panoptic_segmentation"]
