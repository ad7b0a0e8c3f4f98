"""The ``DeformableDetr`` meta-architecture (Zhu et al., ICLR 2021), registered in
detectron2's META_ARCH_REGISTRY.

backbone levels -> ``MultiScaleProjection`` neck -> deformable encoder -> queries (learned,
or two-stage proposals) -> deformable decoder (optionally refining its boxes layer by
layer) -> per-layer class (sigmoid, K outputs) and box heads. Trained with the focal
``FocalSetCriterion``; inference keeps the top-k (query, class) pairs.
"""
import copy
import math

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from detr_d2.modeling.detr import Detr, build_masked_backbone, configured_num_classes
from detr_d2.modeling.deformable_transformer import DeformableTransformer, refined_boxes
from detr_d2.modeling.float32 import float32_island
from detr_d2.modeling.mlp import MLP
from detr_d2.modeling.multi_scale.focal import FocalSetCriterion
from detr_d2.modeling.multi_scale.neck import MultiScaleProjection
from detr_d2.modeling.multi_scale.topk_postprocess import topk_results_for_batch
from detr_d2.modeling.position_encoding import PositionEmbeddingSine

__all__ = ["DeformableDetr", "build_multi_scale_backbone", "build_multi_scale_neck", "multi_scale_position_embedding"]

# Prior probability of the class heads' initial bias (focal-loss practice).
PRIOR_PROBABILITY = 0.01


def build_multi_scale_backbone(cfg):
    """detectron2's backbone with MODEL.MULTI_SCALE.IN_FEATURES among its outputs, wrapped
    to return padding masks (``MaskedBackbone.levels_and_masks``)."""
    cfg = cfg.clone()
    cfg.defrost()
    names = list(cfg.MODEL.MULTI_SCALE.IN_FEATURES)
    if cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone":
        cfg.MODEL.RESNETS.OUT_FEATURES = names
    cfg.MODEL.DETR.IN_FEATURE = names[-1]
    backbone = build_masked_backbone(cfg)
    missing = [name for name in names if name not in backbone.body.output_shape()]
    if missing:
        raise ValueError(f"MODEL.MULTI_SCALE.IN_FEATURES {names}: {missing} not among the outputs of "
                         f"{cfg.MODEL.BACKBONE.NAME} ({sorted(backbone.body.output_shape())})")
    return backbone


def build_multi_scale_neck(cfg, backbone):
    """The ``input_proj`` neck for MODEL.MULTI_SCALE.IN_FEATURES of ``backbone``."""
    shapes = backbone.body.output_shape()
    channels = [shapes[name].channels for name in cfg.MODEL.MULTI_SCALE.IN_FEATURES]
    return MultiScaleProjection(channels, cfg.MODEL.DETR.HIDDEN_DIM, cfg.MODEL.MULTI_SCALE.NUM_FEATURE_LEVELS)


def multi_scale_position_embedding(cfg):
    """The levels' normalised sine position encoding (MODEL.MULTI_SCALE.POSITION_*)."""
    multi_scale = cfg.MODEL.MULTI_SCALE
    return PositionEmbeddingSine(cfg.MODEL.DETR.HIDDEN_DIM // 2, temperature=multi_scale.POSITION_TEMPERATURE,
                                 normalize=True, offset=multi_scale.POSITION_OFFSET)


def _heads(head, count, separate):
    """``count`` heads: deep copies of ``head`` when ``separate``, else ``head`` itself each time."""
    return nn.ModuleList(copy.deepcopy(head) if separate else head for _ in range(count))


@META_ARCH_REGISTRY.register()
class DeformableDetr(Detr):
    """Deformable DETR: multi-scale deformable attention, optional iterative box refinement
    (``with_box_refine``) and two-stage query selection (``two_stage``).

    Inputs and outputs as ``Detr``'s (detectron2's list of dicts; boxes xyxy absolute).
    Training output: the weighted losses (loss_ce (focal), loss_bbox, loss_giou; ``_i`` for
    earlier decoder layer i; ``_enc`` for the two-stage proposals). Inference output:
    [{"instances": Instances}] of the ``topk`` best (query, class) pairs: ``pred_boxes``
    xyxy in pixels of the requested size, ``scores`` (sigmoid), ``pred_classes``.

    ``class_embed`` / ``bbox_embed``: one head per decoder layer (+1 for the two-stage
    proposals), the same module repeated unless ``with_box_refine``.
    """

    @configurable
    def __init__(self, *, backbone, input_proj, position_embedding, transformer, criterion, num_classes,
                 num_queries, pixel_mean, pixel_std, in_features=("res3", "res4", "res5"), with_box_refine=False,
                 two_stage=False, topk=100):
        self.init_shared_parts(backbone, in_features, input_proj, position_embedding, transformer, criterion,
                               num_classes, topk, pixel_mean, pixel_std)
        hidden_dim = transformer.d_model
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        num_decoder_layers = len(transformer.decoder.layers)
        num_heads = num_decoder_layers + (1 if two_stage else 0)
        self.class_embed = _heads(self.initial_class_head(hidden_dim, num_classes), num_heads, with_box_refine)
        self.bbox_embed = _heads(self.initial_box_head(hidden_dim, with_box_refine or two_stage), num_heads,
                                 with_box_refine)

    def init_shared_parts(self, backbone, in_features, input_proj, position_embedding, transformer, criterion,
                          num_classes, topk, pixel_mean, pixel_std):
        """Module setup and the parts every multi-scale meta-architecture holds (``Dino`` too):
        backbone levels ``in_features``, neck, position encoding, transformer, criterion,
        classes, ``topk`` detections, pixel normalisation."""
        nn.Module.__init__(self)
        self.backbone = backbone
        self.in_features = tuple(in_features)
        self.input_proj = input_proj
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.topk = topk
        self.mask_head = None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @staticmethod
    def initial_class_head(hidden_dim, num_classes):
        head = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(head.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        return head

    @staticmethod
    def initial_box_head(hidden_dim, size_from_reference):
        """The box MLP, its last layer zero; the size logits start at -2 (boxes of ~0.12)
        unless they refine a reference box (refinement, two-stage)."""
        head = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(head.layers[-1].weight)
        nn.init.zeros_(head.layers[-1].bias)
        if not size_from_reference:
            nn.init.constant_(head.layers[-1].bias[2:], -2.0)
        return head

    @classmethod
    def from_config(cls, cfg):
        detr, multi_scale = cfg.MODEL.DETR, cfg.MODEL.MULTI_SCALE
        backbone = build_multi_scale_backbone(cfg)
        return {
            "backbone": backbone,
            "input_proj": build_multi_scale_neck(cfg, backbone),
            "position_embedding": multi_scale_position_embedding(cfg),
            "transformer": DeformableTransformer(
                d_model=detr.HIDDEN_DIM, nhead=detr.NHEADS, num_encoder_layers=detr.ENC_LAYERS,
                num_decoder_layers=detr.DEC_LAYERS, dim_feedforward=detr.DIM_FEEDFORWARD, dropout=detr.DROPOUT,
                num_feature_levels=multi_scale.NUM_FEATURE_LEVELS, enc_n_points=multi_scale.ENC_N_POINTS,
                dec_n_points=multi_scale.DEC_N_POINTS, two_stage=multi_scale.TWO_STAGE,
                two_stage_num_proposals=detr.NUM_OBJECT_QUERIES),
            "criterion": FocalSetCriterion(cfg),
            "num_classes": configured_num_classes(cfg),
            "num_queries": detr.NUM_OBJECT_QUERIES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "in_features": multi_scale.IN_FEATURES,
            "with_box_refine": multi_scale.WITH_BOX_REFINE,
            "two_stage": multi_scale.TWO_STAGE,
            "topk": multi_scale.TOPK_DETECTIONS,
        }

    def multi_scale_maps(self, images):
        """ImageList -> (maps [B, C, h_l, w_l], masks [B, h_l, w_l], positions [B, C, h_l, w_l])
        for every level of the neck."""
        levels, level_masks, pixel_mask = self.backbone.levels_and_masks(images.tensor, images.image_sizes,
                                                                         self.in_features)
        maps, masks = self.input_proj(levels, pixel_mask, level_masks)
        positions = [self.position_embedding(mask).to(maps[0].dtype) for mask in masks]
        return maps, masks, positions

    @float32_island
    def heads(self, hidden, references):
        """hidden [L, B, Q, C], references (per layer [B, Q, 2|4]) -> (logits [L, B, Q, K],
        boxes [L, B, Q, 4] normalised cxcywh), each layer through its own heads."""
        logits = torch.stack([self.class_embed[i](h) for i, h in enumerate(hidden)])
        boxes = torch.stack([refined_boxes(self.bbox_embed[i](h), references[i]) for i, h in enumerate(hidden)])
        return logits, boxes

    def predict(self, images):
        """ImageList -> (logits [L, B, Q, K], boxes [L, B, Q, 4] normalised cxcywh,
        encoder_outputs: two-stage proposals (logits [B, S, K], boxes [B, S, 4]) or None)."""
        maps, masks, positions = self.multi_scale_maps(images)
        num_decoder_layers = len(self.transformer.decoder.layers)
        hidden, references, encoder_outputs = self.transformer(
            maps, masks, positions,
            query_embed=None if self.two_stage else self.query_embed.weight,
            box_heads=self.bbox_embed[:num_decoder_layers] if self.with_box_refine else None,
            proposal_heads=(self.class_embed[-1], self.bbox_embed[-1]) if self.two_stage else None)
        return (*self.heads(hidden, references), encoder_outputs)

    def predictions(self, images):
        """(logits, boxes, encoder_outputs): see ``predict``. The third item takes the place
        of ``Detr``'s mask logits in the shared training and evaluation flow: the criterion
        reads it as the two-stage proposals."""
        return self.predict(images)

    def training_predictions(self, images):
        return self.predict(images)

    def inference_results(self, logits, boxes, encoder_outputs, batched_inputs, images):
        """The top-k detections of the last decoder layer (see the class docstring)."""
        return topk_results_for_batch(logits[-1], boxes[-1], batched_inputs, images.image_sizes, self.topk)
