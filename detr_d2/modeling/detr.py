"""The ``Detr`` meta-architecture (registered in detectron2's META_ARCH_REGISTRY)."""
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from torch import nn

from detr_d2.modeling.backbone import MaskedBackbone, undilate_first_res5_block
from detr_d2.modeling.box_ops import absolute_xyxy_to_normalized_cxcywh
from detr_d2.modeling.criterion import SetCriterion
from detr_d2.modeling.mlp import MLP
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


def build_masked_backbone(cfg):
    """detectron2's backbone from the config, wrapped to return DETR's padding mask."""
    body = build_backbone(cfg)
    if cfg.MODEL.RESNETS.RES5_DILATION == 2 and hasattr(body, "res5"):
        undilate_first_res5_block(body)
    return MaskedBackbone(body, cfg.MODEL.DETR.IN_FEATURE)


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

    Variants override ``queries`` (the decoder's queries) and ``losses`` (training
    targets and criterion), e.g. ``GroupDetr``.
    """

    @configurable
    def __init__(self, *, backbone, position_embedding, transformer, criterion, num_classes,
                 num_queries, pixel_mean, pixel_std):
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
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        detr = cfg.MODEL.DETR
        if cls is Detr and detr.NUM_QUERY_GROUPS != 1:
            raise ValueError(f"MODEL.DETR.NUM_QUERY_GROUPS {detr.NUM_QUERY_GROUPS} needs MODEL.META_ARCHITECTURE "
                             "'GroupDetr' (detr_d2.engine.build_model picks it for 'Detr')")
        num_classes = configured_num_classes(cfg)
        return {
            "backbone": build_masked_backbone(cfg),
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

    def predict(self, images):
        """ImageList -> (logits [L, B, Q, K+1], boxes [L, B, Q, 4] normalised cxcywh), one
        entry per decoder layer, the last being the final prediction (Q: see ``queries``)."""
        features, mask = self.backbone(images.tensor, images.image_sizes)
        pos = self.position_embedding(mask).to(features.dtype)
        query_embed, query_attn_mask = self.queries()
        hidden = self.transformer(self.input_proj(features), mask, query_embed, pos, query_attn_mask)
        return self.class_embed(hidden), self.bbox_embed(hidden).sigmoid()

    def prepare_targets(self, batched_inputs, image_sizes):
        """Per image {"labels": [n] int64, "boxes": [n, 4] cxcywh normalised by the unpadded size}."""
        targets = []
        for item, (height, width) in zip(batched_inputs, image_sizes):
            instances = item["instances"].to(self.device)
            boxes = absolute_xyxy_to_normalized_cxcywh(instances.gt_boxes.tensor, height, width)
            targets.append({"labels": instances.gt_classes.long(), "boxes": boxes})
        return targets

    def weighted_losses(self, unweighted):
        """Apply the criterion's weights; log class/cardinality errors to EventStorage."""
        weights = self.criterion.weight_dict
        _put_in_event_storage({k: v for k, v in unweighted.items() if k not in weights})
        return {k: v * weights[k] for k, v in unweighted.items() if k in weights}

    def losses(self, logits, boxes, targets):
        """The criterion's unweighted values for predictions of ``predict`` and ``prepare_targets``."""
        return self.criterion(logits, boxes, targets)

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        logits, boxes = self.predict(images)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            return self.weighted_losses(self.losses(logits, boxes, targets))
        return results_for_batch(logits[-1], boxes[-1], batched_inputs, images.image_sizes)
