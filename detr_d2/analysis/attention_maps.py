"""What DETR attends to: the last decoder layer's cross-attention of each query and the last
encoder layer's self-attention, read from a forward pass of the plain or accelerated model.

``record_attention(model)`` is a context manager: only while it is active, forward hooks on
the last decoder layer's ``multihead_attn`` and the last encoder layer's ``self_attn`` run
each attention a second time with ``need_weights=True, average_attn_weights=False`` and keep
the weights per head (in eval mode; in training the second call would draw other dropout);
a hook on the position embedding keeps the feature map's padding mask. The model's own
call (``need_weights=False``, torch's fused kernel) and its output are left untouched, so
the detections are bit-identical with and without recording; asking torch for the weights
in the model's own call would change them by float rounding (1.7e-6 measured). On exit
the hooks are removed: a model that is not being recorded runs exactly as before.

Maps are cut to each image's unpadded feature cells (``ImageAttention``) and only then
upsampled to the image (``ImageAttention.to_image``).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from detr_d2.errors import SetupError
from detr_d2.modeling.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from detr_d2.modeling.transformer import Transformer

__all__ = ["AttentionRecording", "ImageAttention", "detections_with_attention", "record_attention"]

POSITION_EMBEDDINGS = (PositionEmbeddingSine, PositionEmbeddingLearned)


def _only_module_of_type(model, module_types):
    """The one submodule of ``model`` that is an instance of one of ``module_types`` (a tuple
    of classes); SetupError otherwise."""
    found = [module for module in model.modules() if isinstance(module, module_types)]
    if len(found) != 1:
        names = " or ".join(module_type.__name__ for module_type in module_types)
        raise SetupError(f"The model ({type(model).__name__}) has {len(found)} {names} modules; "
                         "attention maps need a DETR model with exactly one")
    return found[0]


def _last_layer_attentions(transformer):
    """(cross-attention of the last decoder layer, self-attention of the last encoder layer)."""
    if not transformer.encoder.layers or not transformer.decoder.layers:
        raise SetupError("Attention maps need at least one encoder and one decoder layer "
                         "(MODEL.DETR.ENC_LAYERS, MODEL.DETR.DEC_LAYERS)")
    return transformer.decoder.layers[-1].multihead_attn, transformer.encoder.layers[-1].self_attn


@dataclass
class AttentionRecording:
    """What the last forward pass attended to (filled in by ``record_attention``), on the CPU.

    decoder: [B, heads, Q, h*w] cross-attention weights of the last decoder layer (query ->
        feature cell, row-major over the [h, w] feature map); each row sums to 1 over the
        image's unpadded cells, padded cells hold 0.
    encoder: [B, heads, h*w, h*w] self-attention weights of the last encoder layer (cell ->
        cell), the same way.
    padding_mask: [B, h, w] bool, True on the feature cells of the batch padding.
    """

    decoder: torch.Tensor = None
    encoder: torch.Tensor = None
    padding_mask: torch.Tensor = None

    def image(self, index, input_size, padded_size, output_size):
        """The ``ImageAttention`` of image ``index`` of the batch.

        input_size: (height, width) the network saw it at (after the test-time resize,
        before padding); padded_size: (H, W) of the padded batch; output_size: the size its
        detections are reported in (the original image's)."""
        valid = ~self.padding_mask[index]
        cells = (int(valid[:, 0].sum()), int(valid[0, :].sum()))
        feature_shape = tuple(self.padding_mask.shape[1:])
        return ImageAttention(
            decoder=_cells_of_image(self.decoder[index], feature_shape, cells),
            encoder=_encoder_cells_of_image(self.encoder[index], feature_shape, cells),
            cell_size=(padded_size[0] / feature_shape[0], padded_size[1] / feature_shape[1]),
            input_size=tuple(input_size),
            output_size=tuple(output_size))


def _cells_of_image(weights, feature_shape, cells):
    """weights [..., h*w] over the padded feature map -> [..., rows, cols]: the top-left
    ``cells`` = (rows, cols) block, the cells of the unpadded image (padding is bottom/right)."""
    rows, cols = cells
    return weights.reshape(*weights.shape[:-1], *feature_shape)[..., :rows, :cols]


def _encoder_cells_of_image(weights, feature_shape, cells):
    """Encoder weights [heads, h*w, h*w] over the padded feature map -> [heads, rows*cols,
    rows, cols]: from and to the cells of the unpadded image only (see ``_cells_of_image``)."""
    rows, cols = cells
    heads = weights.shape[0]
    grid = weights.reshape(heads, *feature_shape, *feature_shape)[:, :rows, :cols, :rows, :cols]
    return grid.reshape(heads, rows * cols, rows, cols)


@dataclass
class ImageAttention:
    """One image's attention maps over its own (unpadded) feature cells.

    decoder: [heads, Q, rows, cols] cross-attention of every query; sums to 1 per query and head.
    encoder: [heads, rows*cols, rows, cols] self-attention from every cell (row-major) of the
        image; sums to 1 per source cell and head.
    cell_size: (height, width) of one feature cell in network-input pixels (padded batch
        size / feature map size, as DETR's padding mask is resized).
    input_size: (height, width) the network saw; output_size: (height, width) of the image
        the maps are drawn on (the original image, where the detections' boxes are).
    """

    decoder: torch.Tensor
    encoder: torch.Tensor
    cell_size: tuple
    input_size: tuple
    output_size: tuple

    @property
    def cells(self):
        """(rows, cols) of the image's feature cells."""
        return tuple(self.decoder.shape[-2:])

    def encoder_cell_at(self, x, y):
        """Row-major index of the feature cell holding the point (x, y) (pixels of the output
        image), clamped to the image's cells."""
        rows, cols = self.cells
        row = int(y * self.input_size[0] / self.output_size[0] / self.cell_size[0])
        col = int(x * self.input_size[1] / self.output_size[1] / self.cell_size[1])
        return min(max(row, 0), rows - 1) * cols + min(max(col, 0), cols - 1)

    def encoder_from(self, x, y):
        """[heads, rows, cols]: the encoder self-attention from the cell at (x, y) (pixels of
        the output image)."""
        return self.encoder[:, self.encoder_cell_at(x, y)]

    def to_image(self, maps, size=None):
        """maps [..., rows, cols] -> [..., height, width], bilinear; ``size`` (height,
        width): the output image's pixels (default ``output_size``) or the same image
        drawn at another size.

        The cells span ``cells x cell_size`` input pixels, a little more than the image when
        its size is not a multiple of the cell size; the maps are upsampled to that span (in
        output pixels) and the part beyond the image is cut off, so each cell stays on the
        pixels it was computed from."""
        (rows, cols), (cell_h, cell_w) = self.cells, self.cell_size
        height, width = size or self.output_size
        span = (max(height, round(rows * cell_h * height / self.input_size[0])),
                max(width, round(cols * cell_w * width / self.input_size[1])))
        flat = maps.reshape(-1, 1, rows, cols).float()
        upsampled = F.interpolate(flat, size=span, mode="bilinear", align_corners=False)
        return upsampled[..., :height, :width].reshape(*maps.shape[:-2], height, width)


def _weights_hook(recording, field):
    """Forward hook of an ``nn.MultiheadAttention`` that stores its per-head weights
    [B, heads, Lq, Lk] in ``recording.<field>``, leaving the module's output as it is."""

    def hook(module, args, kwargs, output):
        asked = {**kwargs, "need_weights": True, "average_attn_weights": False}
        setattr(recording, field, module.forward(*args, **asked)[1].detach().cpu())

    return hook


def _padding_mask_hook(recording):
    """Forward hook of the position embedding (called with the feature map's padding mask
    [B, h, w]) storing that mask in ``recording``."""

    def hook(module, args, output):
        recording.padding_mask = args[0].detach().cpu()

    return hook


@contextmanager
def record_attention(model):
    """Within the block, every forward pass of ``model`` (a DETR holding one detr_d2
    ``Transformer`` and one position embedding) fills the yielded ``AttentionRecording``;
    the hooks are removed on leaving it. Raises SetupError for a model without them."""
    decoder_attention, encoder_attention = _last_layer_attentions(_only_module_of_type(model, (Transformer,)))
    position_embedding = _only_module_of_type(model, POSITION_EMBEDDINGS)
    recording = AttentionRecording()
    handles = [
        decoder_attention.register_forward_hook(_weights_hook(recording, "decoder"), with_kwargs=True),
        encoder_attention.register_forward_hook(_weights_hook(recording, "encoder"), with_kwargs=True),
        position_embedding.register_forward_hook(_padding_mask_hook(recording)),
    ]
    try:
        yield recording
    finally:
        for handle in handles:
            handle.remove()


def detections_with_attention(model, inputs):
    """Run ``model`` (a ``Detr`` in eval mode) on ``inputs`` (detectron2's [{"image",
    "height", "width"}]) while recording; per input (CPU ``Instances`` of every query, its
    ``ImageAttention`` with ``output_size`` = the input's "height" x "width").

    The network input and padded batch sizes are those of the model's own
    ``preprocess_image``."""
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        with record_attention(model) as recording:
            outputs = model(inputs)
    padded_size = tuple(images.tensor.shape[-2:])
    return [(output["instances"].to("cpu"),
             recording.image(index, input_size, padded_size, (item["height"], item["width"])))
            for index, (output, item, input_size) in enumerate(zip(outputs, inputs, images.image_sizes))]
