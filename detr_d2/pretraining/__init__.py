"""Backbone pretraining with a throwaway CenterNet-style dense head.

DETR trained from scratch on a CPU stays on its early plateau; a backbone that already
finds objects lets it converge in minutes. This package trains the
backbone of a DETR config (e.g. the tiny CNN of configs/shapes/Base-Shapes.yaml) on a
COCO-json dataset to predict, on its output feature map (stride s):

* a centre heatmap per class (or one class-agnostic channel): Gaussians at the box
  centres, sigma = max(0.5, 0.15 * box side / s) per axis, peak 1 at the cell holding
  the centre; CenterNet focal loss (alpha 2, beta 4) normalised by the number of objects;
* four box values at each centre cell: width / image width, height / image height and
  the centre's offset (x, y) inside its cell (in cells); 5 x L1, averaged over objects
  and values (``centernet_targets``).

Head (``dense_head``): 3x3 conv to 128 channels, ReLU, 1x1 conv to (heatmap channels +
4); heatmap bias -2.19 (initial score 0.1). AdamW (lr 2e-3, weight decay 1e-4 by
default), linear warm-up, then cosine decay to 0 over the run (``schedule``); the run ends
at ``max_iter`` iterations or after ``max_minutes``, whichever comes first (the cosine
follows whichever is further along). The backbone trains with trainable BatchNorm (the
config's MODEL.TINY_CNN.NORM and MODEL.BACKBONE.FREEZE_AT are overridden to "BN" and 0;
``config``). Images: xyxy absolute-pixel boxes, random horizontal flips, batches
normalised with the config's pixel mean/std and zero-padded bottom/right to a multiple
of the stride (``coco_images``, ``batches``).

Evaluation (every ``eval_period`` iterations and at the end): decode each image's heatmap
peaks (3x3 max-pool, top ``top_k``) into boxes (``decoding``) and score them with
pycocotools' COCOeval (bbox) against the val json (``evaluation``); logged as "dense head
AP".

Output (``backbone_checkpoint``), written atomically at each evaluation:
``{"model": backbone state dict, "pretrain": {...run facts}}`` with the keys the Detr
model of the same config gives its backbone (``backbone.body.<name>``, checked at
start-up) and no ``num_batches_tracked``, so detectron2's DetectionCheckpointer loads it
as MODEL.WEIGHTS also into a FrozenBN backbone.

Entry point: ``pretrain_backbone(PretrainingOptions(...))`` (``loop``); the command line
is tools/pretrain_backbone.py.
"""
from detr_d2.pretraining.backbone_checkpoint import DETR_BACKBONE_PREFIX, backbone_checkpoint, check_detr_names
from detr_d2.pretraining.coco_images import CocoImages, paths_of_split
from detr_d2.pretraining.dense_head import DenseDetector, DenseHead
from detr_d2.pretraining.loop import PretrainingOptions, pretrain_backbone

__all__ = ["DETR_BACKBONE_PREFIX", "CocoImages", "DenseDetector", "DenseHead", "PretrainingOptions",
           "backbone_checkpoint", "check_detr_names", "paths_of_split", "pretrain_backbone"]
