"""The ``Detr`` meta-architecture (registered in detectron2's META_ARCH_REGISTRY)."""
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, ImageList, PolygonMasks
from detectron2.utils.events import get_event_storage
from torch import nn

from detr_d2.modeling.backbone import MaskedBackbone, undilate_first_res5_block
from detr_d2.modeling.box_ops import absolute_xyxy_to_normalized_cxcywh
from detr_d2.modeling.criterion import SetCriterion
from detr_d2.modeling.float32 import float32_island, in_current_autocast
from detr_d2.modeling.mask_head import NUM_LEVELS, MaskHead, mask_head_levels
from detr_d2.modeling.mlp import MLP
from detr_d2.modeling.panoptic import add_panoptic_segmentation, build_panoptic_postprocess
from detr_d2.modeling.position_encoding import build_position_embedding
from detr_d2.modeling.postprocess import results_for_batch
from detr_d2.modeling.transformer import Transformer


def _put_in_event_storage(metrics):
    """Log 0-dim tensors to detectron2's EventStorage when one is active (training loops),
    read from the device in one transfer."""
    try:
        storage = get_event_storage()
    except AssertionError:
        return
    values = torch.stack([value.float() for value in metrics.values()]).tolist() if metrics else []
    storage.put_scalars(**dict(zip(metrics, values)))


MASK_HEAD_FEATURES = ("res2", "res3", "res4", "res5")


def with_mask_head_features(cfg):
    """With MODEL.MASK_ON and a detectron2 ResNet: ``cfg`` whose MODEL.RESNETS.OUT_FEATURES
    also holds res2-res5 (the mask head reads them); otherwise ``cfg`` itself."""
    if not cfg.MODEL.MASK_ON or cfg.MODEL.BACKBONE.NAME != "build_resnet_backbone":
        return cfg
    out_features = list(cfg.MODEL.RESNETS.OUT_FEATURES)
    missing = [name for name in MASK_HEAD_FEATURES if name not in out_features]
    if not missing:
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.RESNETS.OUT_FEATURES = out_features + missing
    return cfg


def build_masked_backbone(cfg):
    """detectron2's backbone from the config, wrapped to return DETR's padding mask."""
    body = build_backbone(with_mask_head_features(cfg))
    if cfg.MODEL.RESNETS.RES5_DILATION == 2 and hasattr(body, "res5"):
        undilate_first_res5_block(body)
    return MaskedBackbone(body, cfg.MODEL.DETR.IN_FEATURE)


def build_mask_head(cfg, backbone):
    """The mask head of MODEL.MASK_ON (None when off), reading the three backbone levels
    next finer than MODEL.DETR.IN_FEATURE (res4, res3, res2 of a ResNet; the tiny CNN's
    earlier stages); its adapters take their channel counts."""
    if not cfg.MODEL.MASK_ON:
        return None
    shapes = backbone.body.output_shape()
    levels = mask_head_levels(shapes, backbone.in_feature)
    if len(levels) < NUM_LEVELS:
        raise ValueError(f"MODEL.MASK_ON needs {NUM_LEVELS} backbone features finer than MODEL.DETR.IN_FEATURE "
                         f"{backbone.in_feature!r} (res4, res3, res2 for res5), but {cfg.MODEL.BACKBONE.NAME} gives "
                         f"{sorted(shapes)}; use a ResNet with MODEL.RESNETS.OUT_FEATURES "
                         "['res2', 'res3', 'res4', 'res5'] or a backbone with more stages")
    detr = cfg.MODEL.DETR
    return MaskHead(detr.HIDDEN_DIM, detr.NHEADS, levels, [shapes[name].channels for name in levels])


def build_transformer(cfg):
    """DETR's encoder-decoder of MODEL.DETR's sizes."""
    detr = cfg.MODEL.DETR
    return Transformer(d_model=detr.HIDDEN_DIM, nhead=detr.NHEADS, num_encoder_layers=detr.ENC_LAYERS,
                       num_decoder_layers=detr.DEC_LAYERS, dim_feedforward=detr.DIM_FEEDFORWARD,
                       dropout=detr.DROPOUT, pre_norm=detr.PRE_NORM)


def configured_num_classes(cfg):
    """MODEL.DETR.NUM_CLASSES, which the config building step fills in from the data."""
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    if num_classes is None:
        raise ValueError("MODEL.DETR.NUM_CLASSES is unset: build the config with "
                         "detr_d2.engine.build_config (it takes the count from DATASETS.TRAIN) or set it")
    if num_classes <= 0:
        raise ValueError(f"MODEL.DETR.NUM_CLASSES must be positive, got {num_classes}")
    return num_classes


def bool_masks(instances, height, width):
    """``gt_masks`` of ``instances`` (PolygonMasks or BitMasks) as bool [n, height, width]."""
    gt_masks = instances.gt_masks
    if isinstance(gt_masks, PolygonMasks):
        gt_masks = BitMasks.from_polygon_masks(gt_masks, height, width)
    return gt_masks.tensor.to(torch.bool)


@META_ARCH_REGISTRY.register()
class Detr(nn.Module):
    """DETR: backbone -> 1x1 projection -> transformer -> class and box heads per query.

    Input: detectron2's list of dicts, each with "image" (uint8 [3, H, W] in the channel
    order of MODEL.PIXEL_MEAN, RGB for DETR), optional "height"/"width" (size to report
    results in) and, for training, "instances" (``gt_boxes`` xyxy absolute pixels of the
    given image, ``gt_classes``).
    Training output: the weighted losses (loss_ce, loss_bbox, loss_giou, and loss_*_i for
    earlier decoder layer i); class_error and cardinality_error go to EventStorage only.
    Inference output: [{"instances": Instances}] with every query: ``pred_boxes`` xyxy in
    pixels of the requested size, ``scores``, ``pred_classes``.

    With a ``mask_head`` (MODEL.MASK_ON): training inputs also carry ``gt_masks``
    (PolygonMasks or BitMasks), the losses add loss_mask and loss_dice (last layer), and the
    instances add ``pred_masks`` bool [Q, height, width]. With ``panoptic`` too
    (MODEL.DETR.PANOPTIC_ON), each result also holds "panoptic_seg": (int32 [height, width]
    segment ids, segments_info), see ``modeling.panoptic``.

    Evaluation against ground truth: ``inference_with_losses`` gives the inference output
    and each image's criterion values from one forward pass.

    Variants override ``queries`` (the decoder's queries) and ``losses`` (training
    targets and criterion), e.g. ``GroupDetr``.
    """

    @configurable
    def __init__(self, *, backbone, position_embedding, transformer, criterion, num_classes,
                 num_queries, pixel_mean, pixel_std, mask_head=None, mask_threshold=0.5, panoptic=None):
        super().__init__()
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.position_embedding = position_embedding
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.criterion = criterion
        self.num_classes = num_classes
        self.mask_head = mask_head
        self.mask_threshold = mask_threshold
        self.panoptic = panoptic
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        detr = cfg.MODEL.DETR
        if cls is Detr and detr.NUM_QUERY_GROUPS != 1:
            raise ValueError(f"MODEL.DETR.NUM_QUERY_GROUPS {detr.NUM_QUERY_GROUPS} needs MODEL.META_ARCHITECTURE "
                             "'GroupDetr' (detectron2's build_model picks it for 'Detr' after import detr_d2)")
        num_classes = configured_num_classes(cfg)
        backbone = build_masked_backbone(cfg)
        return {
            "backbone": backbone,
            "mask_head": build_mask_head(cfg, backbone),
            "mask_threshold": cfg.MODEL.MASK_THRESHOLD,
            "panoptic": build_panoptic_postprocess(cfg, num_classes),
            "position_embedding": build_position_embedding(detr.POSITION_EMBEDDING, detr.HIDDEN_DIM),
            "transformer": build_transformer(cfg),
            "criterion": SetCriterion(cfg),
            "num_classes": num_classes,
            "num_queries": detr.NUM_OBJECT_QUERIES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        """Normalise each image and pad the batch at the bottom/right with zeros."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images)

    def queries(self):
        """(query embeddings [Q, C], decoder self-attention mask [Q, Q] bool or None)."""
        return self.query_embed.weight, None

    @float32_island
    def heads(self, hidden):
        """Decoder outputs [L, B, Q, C] -> (logits [L, B, Q, K+1], boxes [L, B, Q, 4] normalised
        cxcywh). In float32 under autocast too: rounded to bfloat16, near-equal class logits
        became equal (ties flipped the top-1 label of the reference fixtures); the heads
        are a few small matmuls."""
        return self.class_embed(hidden), self.bbox_embed(hidden).sigmoid()

    def predict(self, images):
        """ImageList -> (logits [L, B, Q, K+1], boxes [L, B, Q, 4] normalised cxcywh), one
        entry per decoder layer, the last being the final prediction (Q: see ``queries``)."""
        features, mask = self.backbone(images.tensor, images.image_sizes)
        pos = self.position_embedding(mask).to(features.dtype)
        query_embed, query_attn_mask = self.queries()
        hidden = self.transformer(self.input_proj(features), mask, query_embed, pos, query_attn_mask)
        return self.heads(hidden)

    def predict_with_mask_inputs(self, images):
        """As ``predict``, plus what the mask head reads: (logits, boxes, mask_inputs), the
        last being the arguments of ``mask_head`` (last decoder layer [B, Q, C], encoder
        memory and projected features [B, C, h, w], their padding mask, backbone levels)."""
        levels, mask = self.backbone.all_features_and_mask(images.tensor, images.image_sizes)
        features = levels[self.backbone.in_feature]
        pos = self.position_embedding(mask).to(features.dtype)
        query_embed, query_attn_mask = self.queries()
        projected = self.input_proj(features)
        hidden, memory = self.transformer.encode_decode(projected, mask, query_embed, pos, query_attn_mask)
        mask_inputs = (hidden[-1], memory, projected, mask, levels)
        return (*self.heads(hidden), mask_inputs)

    def predict_with_masks(self, images):
        """As ``predict``, plus the mask head's logits [B, Q, h2, w2] (res2 size of the padded
        batch) for the last decoder layer: (logits, boxes, mask_logits)."""
        logits, boxes, mask_inputs = self.predict_with_mask_inputs(images)
        return logits, boxes, self.mask_head(*mask_inputs)

    def prepare_targets(self, batched_inputs, image_sizes):
        """Per image {"labels": [n] int64, "boxes": [n, 4] cxcywh normalised by the unpadded size},
        with a mask head also "masks": bool [n, h, w] at the unpadded image size."""
        targets = []
        for item, (height, width) in zip(batched_inputs, image_sizes):
            instances = item["instances"].to(self.device)
            boxes = absolute_xyxy_to_normalized_cxcywh(instances.gt_boxes.tensor, height, width)
            targets.append({"labels": instances.gt_classes.long(), "boxes": boxes})
            if self.mask_head is not None:
                targets[-1]["masks"] = bool_masks(instances, height, width)
        return targets

    def weighted_losses(self, unweighted):
        """Apply the criterion's weights; log class/cardinality errors to EventStorage."""
        weights = self.criterion.weight_dict
        _put_in_event_storage({k: v for k, v in unweighted.items() if k not in weights})
        return {k: v * weights[k] for k, v in unweighted.items() if k in weights}

    def losses(self, logits, boxes, targets, mask_logits=None):
        """The criterion's unweighted values for predictions of ``predict`` (or
        ``predict_with_masks``) and ``prepare_targets``."""
        return self.criterion(logits, boxes, targets, mask_logits)

    def predictions(self, images):
        """(logits, boxes, mask_logits): ``predict`` with mask_logits None, or with a mask head
        ``predict_with_masks``."""
        if self.mask_head is None:
            return (*self.predict(images), None)
        return self.predict_with_masks(images)

    def inference_with_losses(self, batched_inputs):
        """Evaluation against ground truth in one forward pass: (results, losses).

        ``batched_inputs``: inference inputs that also carry "instances" (ground truth as in
        training: ``gt_boxes`` xyxy absolute pixels of the given image, ``gt_classes``; with a
        mask head ``gt_masks``). ``results``: what ``forward`` returns in eval mode;
        ``losses``: per image, the criterion's UNWEIGHTED values {name: 0-dim tensor} for
        that image alone (``SetCriterion.per_image``; weights in ``criterion.weight_dict``).
        """
        images = self.preprocess_image(batched_inputs)
        logits, boxes, mask_logits = self.predictions(images)
        targets = self.prepare_targets(batched_inputs, images.image_sizes)
        losses = self.criterion.per_image(logits, boxes, targets, mask_logits)
        return self.inference_results(logits, boxes, mask_logits, batched_inputs, images), losses

    def inference_results(self, logits, boxes, mask_logits, batched_inputs, images):
        """The inference output for the last decoder layer's predictions (see the class
        docstring): instances, and with ``panoptic`` the panoptic segmentation."""
        results = results_for_batch(logits[-1], boxes[-1], batched_inputs, images.image_sizes,
                                    mask_logits, self.mask_threshold)
        if self.panoptic is not None:
            add_panoptic_segmentation(results, self.panoptic, logits[-1], mask_logits, batched_inputs,
                                      images.image_sizes)
        return results

    def training_predictions(self, images):
        """(logits, boxes, mask_logits) for the losses; with a mask head, mask_logits is a
        function of the matched (image, query) positions giving their logits [N, h2, w2]:
        only the matched queries' masks are computed, the only ones the mask losses read
        (the same losses and gradients as from every query's masks, for a fraction of the
        time)."""
        if self.mask_head is None:
            return self.predictions(images)
        logits, boxes, mask_inputs = self.predict_with_mask_inputs(images)
        # called by the criterion (a float32 island): the mask head runs in the model's precision
        return logits, boxes, in_current_autocast(lambda positions: self.mask_head(*mask_inputs, positions=positions))

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        if self.training:
            logits, boxes, mask_logits = self.training_predictions(images)
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            return self.weighted_losses(self.losses(logits, boxes, targets, mask_logits))
        logits, boxes, mask_logits = self.predictions(images)
        return self.inference_results(logits, boxes, mask_logits, batched_inputs, images)
