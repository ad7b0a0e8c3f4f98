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
    unpadded size, in [0, 1]).

    The padding mask is computed from ``image_sizes`` inside the graph
    (``detr_d2.modeling.backbone.pixel_padding_mask``); B, H and W may vary.
    """

    def __init__(self, detr):
        super().__init__()
        self.detr = detr

    def forward(self, images, image_sizes):
        logits, boxes = self.detr.predict(ImageList(images, image_sizes))
        return logits[-1], boxes[-1]
