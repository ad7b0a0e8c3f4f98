"""detr_d2's config keys, added to a detectron2 CfgNode by ``add_detr_config``.

Key names follow the original DETR detectron2 wrapper (``MODEL.DETR.*``,
``SOLVER.OPTIMIZER``, ``SOLVER.BACKBONE_MULTIPLIER``) so its configs load unchanged;
the keys it did not have sit beside them.
"""
from detectron2.config import CfgNode as CN

from detr_d2.modeling.tiny_backbone import add_tiny_cnn_config


def _add_model_keys(cfg):
    cfg.MODEL.DETR = CN()
    # None: taken from the training sets' categories (written into the run's config.yaml).
    cfg.MODEL.DETR.NUM_CLASSES = None
    cfg.MODEL.DETR.HIDDEN_DIM = 256
    cfg.MODEL.DETR.NHEADS = 8
    cfg.MODEL.DETR.DROPOUT = 0.1
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 2048
    cfg.MODEL.DETR.ENC_LAYERS = 6
    cfg.MODEL.DETR.DEC_LAYERS = 6
    cfg.MODEL.DETR.PRE_NORM = False
    cfg.MODEL.DETR.NUM_OBJECT_QUERIES = 100
    # Group DETR training aid (Chen et al. 2022): during training only, NUM_QUERY_GROUPS
    # groups of NUM_OBJECT_QUERIES queries, each matched one-to-one to the targets on its
    # own and attending only to its own group; losses are averaged over the groups.
    # Inference uses the first group alone, i.e. plain DETR. 1 = off (the reference).
    cfg.MODEL.DETR.NUM_QUERY_GROUPS = 1
    # "sine" (normalised, as the reference) or "learned".
    cfg.MODEL.DETR.POSITION_EMBEDDING = "sine"
    # Which backbone output feeds the transformer.
    cfg.MODEL.DETR.IN_FEATURE = "res5"
    # Loss weights of the criterion (class, L1 box, GIoU terms).
    cfg.MODEL.DETR.CLASS_WEIGHT = 1.0
    cfg.MODEL.DETR.L1_WEIGHT = 5.0
    cfg.MODEL.DETR.GIOU_WEIGHT = 2.0
    # Costs of the Hungarian matcher (class, L1 box, GIoU); the loss weights above do not enter it.
    cfg.MODEL.DETR.COST_CLASS = 1.0
    cfg.MODEL.DETR.COST_BBOX = 5.0
    cfg.MODEL.DETR.COST_GIOU = 2.0
    cfg.MODEL.DETR.DEEP_SUPERVISION = True
    cfg.MODEL.DETR.NO_OBJECT_WEIGHT = 0.1
    # With MODEL.MASK_ON: weights of the mask losses (sigmoid focal, dice) of the last layer.
    cfg.MODEL.DETR.MASK_WEIGHT = 1.0
    cfg.MODEL.DETR.DICE_WEIGHT = 1.0
    # The reference's second stage of mask training: a detector checkpoint loaded into the
    # detection part (everything but the mask head), which is then frozen; only the mask
    # head trains. Needs MODEL.MASK_ON. "" = train everything (end to end).
    cfg.MODEL.DETR.FROZEN_WEIGHTS = ""
    # Faster computations that give the same numbers up to float rounding (Detr.set_fast_paths):
    # each FrozenBatchNorm folded into its convolution; on the CPU, oneDNN prepacked ResNet
    # convolutions (the whole ResNet at inference, its frozen stem/stages in training), strided
    # 1x1 convolutions on the subsampled input in CPU training, and
    # dropout masks from 16-bit random slices in training (other masks than torch's, same
    # drop rate to 1/65536). False runs the plain computation (tools/benchmark.py --compare-plain).
    cfg.MODEL.DETR.FAST_PATHS = True


def _add_multi_scale_keys(cfg):
    # The multi-scale DETRs (DeformableDetr, Dino): what only they have. The sizes they share
    # with DETR keep their MODEL.DETR keys (HIDDEN_DIM, NHEADS, ENC_LAYERS, DEC_LAYERS,
    # DIM_FEEDFORWARD, DROPOUT, NUM_OBJECT_QUERIES, NUM_CLASSES, costs and loss weights).
    cfg.MODEL.MULTI_SCALE = CN()
    # Backbone levels fed to the neck, finest first (res3-res5: strides 8, 16, 32); further
    # levels up to NUM_FEATURE_LEVELS come from 3x3 stride-2 convolutions on the last one.
    cfg.MODEL.MULTI_SCALE.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.MULTI_SCALE.NUM_FEATURE_LEVELS = 4
    # Sampling points per head and level of the encoder's and the decoder's deformable attention.
    cfg.MODEL.MULTI_SCALE.ENC_N_POINTS = 4
    cfg.MODEL.MULTI_SCALE.DEC_N_POINTS = 4
    # Iterative box refinement: each decoder layer refines the previous layer's boxes with
    # its own box (and class) head.
    cfg.MODEL.MULTI_SCALE.WITH_BOX_REFINE = False
    # Two-stage: the encoder's top-scoring position proposals become the decoder's queries.
    cfg.MODEL.MULTI_SCALE.TWO_STAGE = False
    # Sigmoid focal classification (matcher cost and loss).
    cfg.MODEL.MULTI_SCALE.FOCAL_ALPHA = 0.25
    cfg.MODEL.MULTI_SCALE.FOCAL_GAMMA = 2.0
    # Inference keeps the TOPK_DETECTIONS best (query, class) pairs of each image.
    cfg.MODEL.MULTI_SCALE.TOPK_DETECTIONS = 100
    # Sine position encoding of the levels: temperature, and the offset added to the
    # cumulative pixel count before normalising (Deformable DETR -0.5, DINO 0).
    cfg.MODEL.MULTI_SCALE.POSITION_TEMPERATURE = 10000
    cfg.MODEL.MULTI_SCALE.POSITION_OFFSET = -0.5
    # Learning-rate factor of the sampling-offset and reference-point projections.
    cfg.MODEL.MULTI_SCALE.LINEAR_PROJ_LR_MULTIPLIER = 0.1


def _add_dino_keys(cfg):
    # DINO (MODEL.META_ARCHITECTURE "Dino"): contrastive denoising in training. DN_NUMBER
    # noised copies of the targets, as positive + negative groups (0: no denoising); each
    # label is replaced by a random class with probability DN_LABEL_NOISE_RATIO / 2; box
    # corners move by up to DN_BOX_NOISE_SCALE x half the box size (negatives: 1-2x that).
    cfg.MODEL.DINO = CN()
    cfg.MODEL.DINO.DN_NUMBER = 100
    cfg.MODEL.DINO.DN_LABEL_NOISE_RATIO = 0.5
    cfg.MODEL.DINO.DN_BOX_NOISE_SCALE = 0.4
    # Label embeddings of the denoising queries: DN_LABELBOOK_SIZE + 1 rows (None: as many as
    # classes); the reference's label book may be larger than its class count.
    cfg.MODEL.DINO.DN_LABELBOOK_SIZE = None
    # One class / box head shared by every decoder layer (the reference's default) or one each.
    cfg.MODEL.DINO.SHARE_CLASS_HEADS = True
    cfg.MODEL.DINO.SHARE_BOX_HEADS = True


def _add_mask_keys(cfg):
    # MODEL.MASK_ON (detectron2's key) adds DETR's mask head. A pixel belongs to a query's
    # predicted mask where sigmoid(mask logit) > MASK_THRESHOLD (the original wrapper's key).
    cfg.MODEL.MASK_THRESHOLD = 0.5


def _add_panoptic_keys(cfg):
    # With MODEL.MASK_ON: inference also gives "panoptic_seg" (detectron2's panoptic format,
    # the reference's PostProcessPanoptic, detr_d2/modeling/panoptic.py). A query makes a
    # segment when its best class (of the K+1 outputs) is not no-object and its probability
    # is > PANOPTIC_THRESHOLD.
    cfg.MODEL.DETR.PANOPTIC_ON = False
    cfg.MODEL.DETR.PANOPTIC_THRESHOLD = 0.85
    # The contiguous class ids (0..NUM_CLASSES-1) that are things; the others are stuff.
    # None: taken from the training sets' metadata (thing_dataset_id_to_contiguous_id) when
    # PANOPTIC_ON (written into the run's config.yaml).
    cfg.MODEL.DETR.PANOPTIC_THING_IDS = None


def _add_solver_keys(cfg):
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # AdamW/SGD update in torch's fused kernel (one pass over all parameters); False: torch's
    # per-parameter loop. The same update up to float rounding.
    cfg.SOLVER.FUSED_OPTIMIZER = True
    # Mixed precision (detr_d2/engine/precision.py) of training (SOLVER.AMP.ENABLED, detectron2's
    # key) and of inference (TEST.AMP.ENABLED): "" = auto (bfloat16 on the CPU, float16 with
    # loss scaling on CUDA), "bfloat16" or "float16". The loss, the matcher and the
    # optimizer state stay float32.
    cfg.SOLVER.AMP.PRECISION = ""


def _add_input_keys(cfg):
    # With probability CROP.PROBABILITY (and CROP.ENABLED), before the multi-scale resize:
    # resize the shortest edge to one of CROP.PRE_RESIZE_SIZES, then crop a random
    # rectangle whose sides are drawn from CROP.SIZE (absolute pixels, CROP.TYPE
    # "absolute_range").
    cfg.INPUT.CROP.PRE_RESIZE_SIZES = (400, 500, 600)
    cfg.INPUT.CROP.PROBABILITY = 0.5


def _add_dataset_keys(cfg):
    # (name, annotation json, image root) triples registered as COCO-json datasets.
    # Relative paths are relative to the current working directory.
    cfg.DATASETS.REGISTER_COCO = ()
    # (name, panoptic json, panoptic PNG folder, image folder) quadruples registered as
    # COCO-panoptic datasets (detr_d2/data/coco_panoptic.py); relative paths as above.
    cfg.DATASETS.REGISTER_COCO_PANOPTIC = ()


def _add_test_keys(cfg):
    # With each evaluation (TEST.EVAL_PERIOD, --eval-only), DETR's criterion on the test sets
    # too, in the same forward pass: stored as val/<name> (val/loss, val/loss_ce_unscaled, ...).
    cfg.TEST.EVAL_LOSSES = True
    # COCOeval of "coco" test sets: "fast" (detectron2's compiled COCOeval_opt, or
    # faster-coco-eval where detectron2 has no compiled ops) or "official" (pycocotools).
    cfg.TEST.COCO_EVAL_IMPL = "fast"
    # Inference (evaluation, --eval-only, tools/demo.py, tools/benchmark.py) under autocast in
    # the dtype of SOLVER.AMP.PRECISION; scores and boxes come out float32.
    cfg.TEST.AMP = CN({"ENABLED": False})


def add_detr_config(cfg):
    """Add every detr_d2 key, with the reference DETR's values, to ``cfg`` in place."""
    _add_model_keys(cfg)
    _add_multi_scale_keys(cfg)
    _add_dino_keys(cfg)
    _add_mask_keys(cfg)
    _add_panoptic_keys(cfg)
    _add_solver_keys(cfg)
    _add_input_keys(cfg)
    _add_dataset_keys(cfg)
    _add_test_keys(cfg)
    add_tiny_cnn_config(cfg)
    return cfg
