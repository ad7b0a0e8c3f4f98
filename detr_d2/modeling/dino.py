"""The ``Dino`` meta-architecture (Zhang et al., "DINO", ICLR 2023), registered in
detectron2's META_ARCH_REGISTRY.

Deformable DETR's backbone levels, neck and encoder; mixed query selection; a decoder of 4-d
anchor boxes refined layer by layer (look-forward-twice); in training, contrastive
denoising queries in front of the matching queries. Trained with ``DinoCriterion``;
inference runs the matching queries alone and keeps the top-k (query, class) pairs.
"""
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from detr_d2.modeling.deformable_detr import (DeformableDetr, _heads, build_multi_scale_backbone,
                                              build_multi_scale_neck, multi_scale_position_embedding)
from detr_d2.modeling.detr import configured_num_classes
from detr_d2.modeling.dino_criterion import DinoCriterion, DinoExtras
from detr_d2.modeling.dino_transformer import DinoTransformer
from detr_d2.modeling.multi_scale.denoising import make_denoising_queries, split_denoising

__all__ = ["Dino"]


@META_ARCH_REGISTRY.register()
class Dino(DeformableDetr):
    """DINO. Inputs and outputs as ``Detr``'s; training output: the weighted losses of
    ``DinoCriterion`` (matching queries per layer, ``_interm``, ``_dn``); inference output:
    the ``topk`` best (query, class) pairs of the last layer.

    Denoising hook: ``predict(images, denoising)`` takes given ``DenoisingQueries`` (e.g. the
    reference's noised queries, for exact tests); ``forward`` in training draws them with
    ``make_denoising_queries``. ``label_enc``: the denoising queries' label embeddings,
    ``dn_labelbook_size`` + 1 rows (default: as many as classes); noised labels are drawn
    among the ``num_classes`` classes, as the reference draws them.
    """

    @configurable
    def __init__(self, *, backbone, input_proj, position_embedding, transformer, criterion, num_classes,
                 pixel_mean, pixel_std, in_features=("res3", "res4", "res5"), share_class_heads=True,
                 share_box_heads=True, topk=300, dn_number=100, dn_label_noise_ratio=0.5, dn_box_noise_scale=0.4,
                 dn_labelbook_size=None):
        self.init_shared_parts(backbone, in_features, input_proj, position_embedding, transformer, criterion,
                               num_classes, topk, pixel_mean, pixel_std)
        hidden_dim = transformer.d_model
        self.two_stage = True
        self.with_box_refine = True
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        labelbook = num_classes if dn_labelbook_size is None else dn_labelbook_size
        if labelbook < num_classes:
            raise ValueError(f"MODEL.DINO.DN_LABELBOOK_SIZE {labelbook} is below the number of classes {num_classes}: "
                             "every class needs its label embedding")
        self.label_enc = nn.Embedding(labelbook + 1, hidden_dim)
        num_layers = len(transformer.decoder.layers)
        self.class_embed = _heads(self.initial_class_head(hidden_dim, num_classes), num_layers, not share_class_heads)
        self.bbox_embed = _heads(self.initial_box_head(hidden_dim, True), num_layers, not share_box_heads)
        # The encoder's proposal heads start as copies of the decoder's initial heads, as the reference's do.
        transformer.enc_out_class_embed.load_state_dict(self.class_embed[0].state_dict())
        transformer.enc_out_bbox_embed.load_state_dict(self.bbox_embed[0].state_dict())

    @classmethod
    def from_config(cls, cfg):
        detr, multi_scale, dino = cfg.MODEL.DETR, cfg.MODEL.MULTI_SCALE, cfg.MODEL.DINO
        backbone = build_multi_scale_backbone(cfg)
        num_classes = configured_num_classes(cfg)
        return {
            "backbone": backbone,
            "input_proj": build_multi_scale_neck(cfg, backbone),
            "position_embedding": multi_scale_position_embedding(cfg),
            "transformer": DinoTransformer(
                num_classes, d_model=detr.HIDDEN_DIM, nhead=detr.NHEADS, num_encoder_layers=detr.ENC_LAYERS,
                num_decoder_layers=detr.DEC_LAYERS, dim_feedforward=detr.DIM_FEEDFORWARD, dropout=detr.DROPOUT,
                num_feature_levels=multi_scale.NUM_FEATURE_LEVELS, enc_n_points=multi_scale.ENC_N_POINTS,
                dec_n_points=multi_scale.DEC_N_POINTS, num_queries=detr.NUM_OBJECT_QUERIES),
            "criterion": DinoCriterion(cfg),
            "num_classes": num_classes,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "in_features": multi_scale.IN_FEATURES,
            "share_class_heads": dino.SHARE_CLASS_HEADS,
            "share_box_heads": dino.SHARE_BOX_HEADS,
            "topk": multi_scale.TOPK_DETECTIONS,
            "dn_number": dino.DN_NUMBER,
            "dn_label_noise_ratio": dino.DN_LABEL_NOISE_RATIO,
            "dn_box_noise_scale": dino.DN_BOX_NOISE_SCALE,
            "dn_labelbook_size": dino.DN_LABELBOOK_SIZE,
        }

    def denoising_queries(self, targets, generator=None):
        """Freshly drawn ``DenoisingQueries`` for ``targets`` (None when DN_NUMBER is 0)."""
        if self.dn_number <= 0:
            return None
        return make_denoising_queries(targets, self.label_enc, len(self.transformer.tgt_embed.weight),
                                      self.num_classes, self.dn_number, self.dn_label_noise_ratio,
                                      self.dn_box_noise_scale, generator)

    def predict(self, images, denoising=None):
        """ImageList (+ denoising queries) -> (logits [L, B, Q, K], boxes [L, B, Q, 4]
        normalised cxcywh of the matching queries, ``DinoExtras``)."""
        maps, masks, positions = self.multi_scale_maps(images)
        hidden, references, (interm_logits, interm_boxes) = self.transformer(
            maps, masks, positions, self.bbox_embed, denoising)
        # keeps label_enc in every graph (distributed training needs a gradient for each
        # parameter, also in a batch without targets, which has no denoising queries)
        hidden = hidden + 0.0 * self.label_enc.weight[0, 0]
        logits, boxes = self.heads(hidden, references[:-1])
        logits, dn_logits = split_denoising(logits, denoising)
        boxes, dn_boxes = split_denoising(boxes, denoising)
        groups = None if denoising is None else denoising.num_groups
        return logits, boxes, DinoExtras(interm_logits, interm_boxes, dn_logits, dn_boxes, groups)

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        targets = self.prepare_targets(batched_inputs, images.image_sizes)
        logits, boxes, extras = self.predict(images, self.denoising_queries(targets))
        return self.weighted_losses(self.criterion(logits, boxes, targets, extras))
