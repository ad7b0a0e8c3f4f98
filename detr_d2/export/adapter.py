"""``ExportableDetr``: a DETR's inference computation with tensor inputs and outputs."""
from detectron2.structures import ImageList
from torch import nn

from detr_d2.modeling.deformable_detr import DeformableDetr

__all__ = ["ExportableDetr", "coarsest_stride", "is_sigmoid_topk"]


def is_sigmoid_topk(model):
    """Whether ``model`` classifies with K sigmoid logits per query and keeps the top-k
    (query, class) pairs (``DeformableDetr``, ``Dino``), rather than with a softmax over K
    classes + "no object" (``Detr``, ``GroupDetr``)."""
    return isinstance(model, DeformableDetr)


def coarsest_stride(model):
    """Pixels per cell of the coarsest feature map ``model`` computes: its backbone's last
    level, halved once more by each extra level of a multi-scale neck."""
    shapes = model.backbone.body.output_shape()
    if not is_sigmoid_topk(model):
        return shapes[model.backbone.in_feature].stride
    extra_levels = len(model.input_proj) - model.input_proj.num_backbone_levels
    return shapes[model.in_features[-1]].stride * 2 ** extra_levels


class ExportableDetr(nn.Module):
    """Wraps a plain DETR (fast paths off): ``Detr``, ``GroupDetr``, ``DeformableDetr`` or
    ``Dino``, for export.

    forward(images float32 [B, 3, H, W]: normalised ((pixel - mean) / std, channels in
    INPUT.FORMAT order), each image at the top-left, zeros on its bottom/right padding;
    image_sizes int64 [B, 2]: the unpadded (height, width) of each image) ->
    (logits float32: the last decoder layer's class logits, [B, Q, K+1] with "no object"
    as the last column (softmax models), or [B, Q, K] sigmoid logits (``is_sigmoid_topk``);
    boxes float32 [B, Q, 4]: (cx, cy, w, h) normalised by each image's unpadded size, in
    [0, 1]); with a mask head (MODEL.MASK_ON) also mask_logits float32 [B, Q, h2, w2]: per
    query, at the res2 size of the padded batch (about H/4 x W/4), no sigmoid.

    The padding mask is computed from ``image_sizes`` inside the graph
    (``detr_d2.modeling.backbone.pixel_padding_mask``); B, H and W may vary.
    """

    def __init__(self, detr):
        super().__init__()
        self.detr = detr

    @property
    def coarsest_stride(self):
        return coarsest_stride(self.detr)

    @property
    def has_masks(self):
        return self.detr.mask_head is not None

    def forward(self, images, image_sizes):
        batch = ImageList(images, image_sizes)
        if not self.has_masks:
            logits, boxes = self.detr.predict(batch)[:2]
            return logits[-1], boxes[-1]
        logits, boxes, mask_logits = self.detr.predict_with_masks(batch)
        return logits[-1], boxes[-1], mask_logits
