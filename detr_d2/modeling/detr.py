"""The ``Detr`` meta-architecture (registered in detectron2's META_ARCH_REGISTRY)."""
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from torch import nn

from detr_d2.data.coco_registration import configured_num_classes
from detr_d2.modeling.backbone import MaskedBackbone, undilate_first_res5_block
from detr_d2.modeling.box_ops import absolute_xyxy_to_normalized_cxcywh
from detr_d2.modeling.criterion import SetCriterion
from detr_d2.modeling.fast_dropout import set_fast_masks
from detr_d2.modeling.fusion import fold_frozen_batchnorm, folds_every_norm, set_norm_folding
from detr_d2.modeling.heads import MLP
from detr_d2.modeling.inference_backbone import supports_prepacked_forward
from detr_d2.modeling.position_encoding import build_position_embedding
from detr_d2.modeling.postprocess import results_for_batch
from detr_d2.modeling.query_groups import group_self_attention_mask, groups_as_batch_entries
from detr_d2.modeling.transformer import Transformer

# Parameters that exist for training only (Group DETR's queries of groups 2..G); inference
# and slim checkpoints (tools/slim_checkpoint.py) do without them.
TRAINING_ONLY_TENSOR_PREFIXES = ("extra_query_embed.",)


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
    """detectron2's backbone from the config, wrapped to return DETR's padding mask; its
    conv + FrozenBatchNorm pairs can fold (``fusion``), as the fast paths decide."""
    body = build_backbone(cfg)
    if cfg.MODEL.RESNETS.RES5_DILATION == 2 and hasattr(body, "res5"):
        undilate_first_res5_block(body)
    return MaskedBackbone(fold_frozen_batchnorm(body), cfg.MODEL.DETR.IN_FEATURE)


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

    ``fast_paths`` (MODEL.DETR.FAST_PATHS; ``set_fast_paths`` switches it at any time):
    computations that give the same numbers up to float rounding, see ``set_fast_paths``.
    """

    @configurable
    def __init__(self, *, backbone, position_embedding, transformer, criterion, num_classes,
                 num_queries, pixel_mean, pixel_std, fast_paths=True, num_query_groups=1):
        super().__init__()
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.position_embedding = position_embedding
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.num_query_groups = num_query_groups
        if num_query_groups > 1:  # training-only queries of groups 2..G (Group DETR)
            self.extra_query_embed = nn.Embedding(num_queries * (num_query_groups - 1), hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.criterion = criterion
        self.num_classes = num_classes
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.set_fast_paths(fast_paths)

    @classmethod
    def from_config(cls, cfg):
        detr = cfg.MODEL.DETR
        num_classes = configured_num_classes(cfg)
        if num_classes <= 0:
            raise ValueError(f"MODEL.DETR.NUM_CLASSES must be positive, got {num_classes}")
        if detr.NUM_QUERY_GROUPS < 1:
            raise ValueError(f"MODEL.DETR.NUM_QUERY_GROUPS must be at least 1, got {detr.NUM_QUERY_GROUPS}")
        return {
            "backbone": build_masked_backbone(cfg),
            "position_embedding": build_position_embedding(detr.POSITION_EMBEDDING, detr.HIDDEN_DIM),
            "transformer": Transformer(d_model=detr.HIDDEN_DIM, nhead=detr.NHEADS,
                                       num_encoder_layers=detr.ENC_LAYERS,
                                       num_decoder_layers=detr.DEC_LAYERS,
                                       dim_feedforward=detr.DIM_FEEDFORWARD,
                                       dropout=detr.DROPOUT, pre_norm=detr.PRE_NORM),
            "criterion": SetCriterion(cfg),
            "num_classes": num_classes,
            "num_queries": detr.NUM_OBJECT_QUERIES,
            "num_query_groups": detr.NUM_QUERY_GROUPS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "fast_paths": detr.FAST_PATHS,
        }

    def set_fast_paths(self, enabled):
        """Switch the fast paths on (True) or off (False, the plain computation).

        Fast paths: conv + FrozenBatchNorm folded into one convolution (``fusion``); in
        eval, the backbone runs channels-last when all its norms fold (``folds_every_norm``).
        On the CPU, a folded detectron2 ResNet runs oneDNN's prepacked, ReLU/residual-fused
        convolutions (``inference_backbone``): all of it in eval without autograd, its
        frozen stem and stages in training. In CPU training, strided 1x1 convolutions read
        the subsampled input (``fusion``) and the transformer's dropout masks come from
        ``fast_dropout``.
        Parameters and buffers do not depend on the switch; outputs neither (up to float
        rounding), except that training draws other dropout masks (drop probability
        quantised to 1/65536, see ``fast_dropout``).
        """
        self.fast_paths = enabled
        self.backbone.channels_last = enabled and folds_every_norm(self.backbone.body)
        self.backbone.prepacked = enabled and supports_prepacked_forward(self.backbone.body)
        set_norm_folding(self.backbone, enabled)
        set_fast_masks(self.transformer, enabled)

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        """Normalise each image and pad the batch at the bottom/right with zeros."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images)

    def queries(self):
        """(query embeddings [Q', C], decoder self-attention mask [Q', Q'] or None): the Q
        queries, or in training with query groups all G*Q of them, kept apart by the mask."""
        if not (self.training and self.num_query_groups > 1):
            return self.query_embed.weight, None
        embeddings = torch.cat([self.query_embed.weight, self.extra_query_embed.weight])
        mask = group_self_attention_mask(self.num_query_groups, len(self.query_embed.weight),
                                         embeddings.device)
        return embeddings, mask

    def predict(self, images):
        """ImageList -> (logits [L, B, Q', K+1], boxes [L, B, Q', 4] normalised cxcywh), one
        entry per decoder layer, the last being the final prediction; Q' = Q, or G*Q for
        query groups in training (see ``queries``)."""
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

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        logits, boxes = self.predict(images)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            if self.num_query_groups > 1:
                logits, boxes, targets = groups_as_batch_entries(logits, boxes, targets,
                                                                 self.num_query_groups)
            return self.weighted_losses(self.criterion(logits, boxes, targets))
        return results_for_batch(logits[-1], boxes[-1], batched_inputs, images.image_sizes)
