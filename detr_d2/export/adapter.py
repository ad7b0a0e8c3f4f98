"""``ExportableDetr``: DETR's inference computation with tensor inputs and outputs."""
from detectron2.structures import ImageList
from torch import nn

__all__ = ["ExportableDetr"]


class ExportableDetr(nn.Module):
    """Wraps a plain ``Detr`` (fast paths off) for export.

    forward(images float32 [B, 3, H, W]: normalised ((pixel - mean) / std, channels in
    INPUT.FORMAT order), each image at the top-left, zeros on its bottom/right padding;
    image_sizes int64 [B, 2]: the unpadded (height, width) of each image) ->
    (logits float32 [B, Q, K+1]: the last decoder layer's class logits, the last column
    being "no object"; boxes float32 [B, Q, 4]: (cx, cy, w, h) normalised by each image's
    unpadded size, in [0, 1]); with a mask head (MODEL.MASK_ON) also mask_logits float32
    [B, Q, h2, w2]: per query, at the res2 size of the padded batch (about H/4 x W/4), no
    sigmoid.

    The padding mask is computed from ``image_sizes`` inside the graph
    (``detr_d2.modeling.backbone.pixel_padding_mask``); B, H and W may vary.
    """

    def __init__(self, detr):
        super().__init__()
        self.detr = detr

    @property
    def has_masks(self):
        return self.detr.mask_head is not None

    def forward(self, images, image_sizes):
        batch = ImageList(images, image_sizes)
        if not self.has_masks:
            logits, boxes = self.detr.predict(batch)
            return logits[-1], boxes[-1]
        logits, boxes, mask_logits = self.detr.predict_with_masks(batch)
        return logits[-1], boxes[-1], mask_logits
