"""Where the multi-scale DETRs (``DeformableDetr``, ``Dino``) look: the sampling points of the
last decoder layer's deformable cross-attention for each query, and of the last encoder
layer's deformable self-attention for each feature position.

A deformable attention reads, per head, level and point, one bilinearly sampled value at a
location near the query's reference point, weighted by an attention weight (the weights of
a head sum to 1 over its levels x points). ``record_sampling(model)`` is a context manager:
only while it is active, forward hooks on the two ``MultiScaleDeformableAttention`` modules
recompute the locations and weights from the call's own inputs with the module's
``offsets_and_weights`` and ``sampling_locations`` (the same functions on the same tensors,
so the same numbers) and keep them on the CPU. The model's call and its output are left
untouched; on exit the hooks are removed.

Locations come out of the attention normalised over each level's padded feature map. As in
the model itself (its reference points are scaled by each level's valid ratio), a level's
unpadded cells span the image: ``ImageSampling`` divides by the valid ratios and scales to
the image's pixels.
"""
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from detr_d2.errors import SetupError
from detr_d2.modeling.deformable_transformer import DeformableTransformer
from detr_d2.modeling.dino_transformer import DinoTransformer
from detr_d2.modeling.multi_scale.deformable_attention import sampling_locations

__all__ = ["ImageSampling", "SamplingRecording", "detection_queries", "detections_with_sampling",
           "feature_level_count", "has_sampling_points", "image_sampling", "record_sampling"]

MULTI_SCALE_TRANSFORMERS = (DeformableTransformer, DinoTransformer)


@dataclass
class SamplingRecording:
    """One ``MultiScaleDeformableAttention`` call of the last forward pass, on the CPU.

    locations: [B, Lq, M, L, P, 2] normalised (x, y) over each level's padded map, where
        head M samples level L with point P for query Lq.
    weights: [B, Lq, M, L, P], summing to 1 over L x P for each query and head.
    reference_points: [B, Lq, L, 2|4] as the attention got them: (x, y) points or (cx, cy,
        w, h) boxes, normalised over each level's padded map (scaled by the valid ratios).
    spatial_shapes: [L, 2] int64 (H_l, W_l) of the padded levels.
    valid_cells: [B, L, 2] int64 (rows, cols) of each image's unpadded cells per level.
    """

    locations: torch.Tensor
    weights: torch.Tensor
    reference_points: torch.Tensor
    spatial_shapes: torch.Tensor
    valid_cells: torch.Tensor

    def valid_ratios(self, index):
        """[L, 2] (x, y): the unpadded fraction of each level's width and height, image ``index``."""
        cells = self.valid_cells[index].flip(-1).to(self.locations.dtype)
        return cells / self.spatial_shapes.flip(-1).to(self.locations.dtype)


def _valid_cells(padding_mask, spatial_shapes):
    """padding_mask [B, S] bool (True on padding, levels flattened row-major one after
    another) -> [B, L, 2] (rows, cols) of unpadded cells per level (padding is bottom/right)."""
    shapes = [(int(height), int(width)) for height, width in spatial_shapes]
    cells = []
    for level, (height, width) in zip(padding_mask.split([h * w for h, w in shapes], dim=1), shapes):
        valid = ~level.reshape(-1, height, width)
        cells.append(torch.stack([valid[:, :, 0].sum(1), valid[:, 0, :].sum(1)], -1))
    return torch.stack(cells, 1)


def _sampling_hook(recording, field):
    """Forward hook of a ``MultiScaleDeformableAttention`` storing its ``SamplingRecording``
    in ``recording[field]``, leaving the module's output as it is."""

    def hook(module, args, kwargs, output):
        call = inspect.signature(module.forward).bind(*args, **kwargs)
        call.apply_defaults()
        query, reference_points = call.arguments["query"], call.arguments["reference_points"]
        spatial_shapes, padding_mask = call.arguments["spatial_shapes"], call.arguments["padding_mask"]
        offsets, weights = module.offsets_and_weights(query)
        locations = sampling_locations(reference_points, offsets, spatial_shapes)
        if padding_mask is None:
            padding_mask = torch.zeros(query.shape[0], call.arguments["value_input"].shape[1], dtype=torch.bool)
        recording[field] = SamplingRecording(
            locations=locations.detach().float().cpu(), weights=weights.detach().float().cpu(),
            reference_points=reference_points.detach().float().cpu(), spatial_shapes=spatial_shapes.cpu(),
            valid_cells=_valid_cells(padding_mask.cpu(), spatial_shapes.cpu()))

    return hook


def _last_layer_attentions(model):
    """(cross-attention of the last decoder layer, self-attention of the last encoder layer)
    of the one multi-scale transformer of ``model``; SetupError otherwise."""
    found = _multi_scale_transformers(model)
    if len(found) != 1:
        raise SetupError(f"The model ({type(model).__name__}) has {len(found)} multi-scale transformers; "
                         "sampling points need a DeformableDetr or Dino model with exactly one")
    transformer = found[0]
    if not transformer.encoder.layers or not transformer.decoder.layers:
        raise SetupError("Sampling points need at least one encoder and one decoder layer "
                         "(MODEL.DETR.ENC_LAYERS, MODEL.DETR.DEC_LAYERS)")
    return transformer.decoder.layers[-1].cross_attn, transformer.encoder.layers[-1].self_attn


@contextmanager
def record_sampling(model):
    """Within the block, every forward pass of ``model`` (a DeformableDetr or Dino) fills the
    yielded dict: "decoder" and "encoder", each a ``SamplingRecording`` of the last layer's
    deformable attention; the hooks are removed on leaving it."""
    decoder_attention, encoder_attention = _last_layer_attentions(model)
    recording = {}
    handles = [decoder_attention.register_forward_hook(_sampling_hook(recording, "decoder"), with_kwargs=True),
               encoder_attention.register_forward_hook(_sampling_hook(recording, "encoder"), with_kwargs=True)]
    try:
        yield recording
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ImageSampling:
    """One image's sampling points, in pixels of the image the detections are reported in.

    decoder_locations: [Q, M, L, P, 2] (x, y) of every decoder query; decoder_weights: [Q, M, L, P].
    decoder_references: [Q, 2] reference points (x, y) or [Q, 4] reference (anchor) boxes
        (cx, cy, w, h) of the last decoder layer.
    encoder_locations: [S, M, L, P, 2], encoder_weights: [S, M, L, P], encoder_references:
        [S, 2]: the same for every encoder position (levels flattened row-major, one after
        another, over the padded maps; ``encoder_position_at`` finds one).
    spatial_shapes: [L, 2] (H_l, W_l) of the padded levels; valid_cells: [L, 2] (rows,
        cols) of this image's cells per level.
    input_size: (height, width) the network saw (test-time resize, before padding);
    output_size: (height, width) of the drawn image.
    """

    decoder_locations: torch.Tensor
    decoder_weights: torch.Tensor
    decoder_references: torch.Tensor
    encoder_locations: torch.Tensor
    encoder_weights: torch.Tensor
    encoder_references: torch.Tensor
    spatial_shapes: torch.Tensor
    valid_cells: torch.Tensor
    input_size: tuple
    output_size: tuple

    @property
    def num_levels(self):
        return len(self.spatial_shapes)

    def strides(self):
        """Per level, network-input pixels per cell: the input's longer side / the level's
        cells along it, rounded to a power of two (the levels' maps are ceil-divided)."""
        side = 0 if self.input_size[0] >= self.input_size[1] else 1
        return [2 ** round(math.log2(self.input_size[side] / int(cells))) for cells in self.valid_cells[:, side]]

    def encoder_position_at(self, x, y, level=0):
        """Index (into the encoder's positions) of the cell of ``level`` holding the point
        (x, y) (pixels of the output image), clamped to the image's cells."""
        rows, cols = self.valid_cells[level].tolist()
        row = min(max(int(y / self.output_size[0] * rows), 0), rows - 1)
        col = min(max(int(x / self.output_size[1] * cols), 0), cols - 1)
        first = int(sum(int(h) * int(w) for h, w in self.spatial_shapes[:level]))
        return first + row * int(self.spatial_shapes[level, 1]) + col


def _to_pixels(locations, ratios, output_size):
    """locations [..., L, P, 2] normalised per padded level -> (x, y) pixels of an image of
    ``output_size`` (height, width), with ``ratios`` [L, 2] the levels' valid ratios (x, y)."""
    size = torch.tensor([output_size[1], output_size[0]], dtype=locations.dtype)
    return locations / ratios[:, None, :] * size


def _references_in_pixels(reference_points, ratios, output_size):
    """[Lq, L, 2|4] normalised per padded level -> [Lq, 2|4] in pixels (the first level's;
    all levels name the same image place)."""
    size = torch.tensor([output_size[1], output_size[0]], dtype=reference_points.dtype)
    first = reference_points[:, 0]
    if first.shape[-1] == 4:
        return first / ratios[0].repeat(2) * size.repeat(2)
    return first / ratios[0] * size


def image_sampling(recording, index, input_size, output_size):
    """The ``ImageSampling`` of image ``index`` of the recorded batch."""
    samplings = {}
    for part in ("decoder", "encoder"):
        sampled = recording[part]
        ratios = sampled.valid_ratios(index)
        samplings[f"{part}_locations"] = _to_pixels(sampled.locations[index], ratios, output_size)
        samplings[f"{part}_weights"] = sampled.weights[index]
        samplings[f"{part}_references"] = _references_in_pixels(sampled.reference_points[index], ratios, output_size)
    encoder = recording["encoder"]
    return ImageSampling(**samplings, spatial_shapes=encoder.spatial_shapes, valid_cells=encoder.valid_cells[index],
                         input_size=tuple(input_size), output_size=tuple(output_size))


def detection_queries(logits, instances):
    """[n] int64: the query of each of ``instances`` (the model's top-k (query, class)
    pairs of ``logits`` [Q, K], best first). SetupError when its scores are not those pairs'
    (a model whose post-processing is not the top-k over queries x classes)."""
    probabilities = logits.float().sigmoid().flatten()
    scores, index = torch.topk(probabilities, len(instances))
    if not torch.equal(scores.cpu(), instances.scores.cpu()):
        raise SetupError("The detections are not the top-k (query, class) pairs of the last decoder layer: "
                         "cannot tell which query made each")
    return torch.div(index, logits.shape[-1], rounding_mode="floor").cpu()


def detections_with_sampling(model, inputs):
    """Run ``model`` (a DeformableDetr or Dino in eval mode) on ``inputs`` (detectron2's
    [{"image", "height", "width"}]) while recording; per input (CPU ``Instances`` of its
    detections, [n] query of each detection, ``ImageSampling`` with ``output_size`` the
    input's "height" x "width").

    The model runs the steps of its own eval-mode ``forward`` (``preprocess_image``,
    ``predictions``, ``inference_results``), so that the last layer's logits tell each
    detection's query."""
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        with record_sampling(model) as recording:
            logits, boxes, extras = model.predictions(images)
        outputs = model.inference_results(logits, boxes, extras, inputs, images)
    results = []
    for index, (output, item, input_size) in enumerate(zip(outputs, inputs, images.image_sizes)):
        instances = output["instances"].to("cpu")
        results.append((instances, detection_queries(logits[-1][index], instances),
                        image_sampling(recording, index, input_size, (item["height"], item["width"]))))
    return results


def _multi_scale_transformers(model):
    return [module for module in model.modules() if isinstance(module, MULTI_SCALE_TRANSFORMERS)]


def has_sampling_points(model):
    """Whether ``model`` reads its features by deformable attention (DeformableDetr, Dino)."""
    return bool(_multi_scale_transformers(model))


def feature_level_count(model):
    """How many feature levels the deformable attention of ``model`` reads; None for a
    model without one (DETR)."""
    transformers = _multi_scale_transformers(model)
    return len(transformers[0].level_embed) if transformers else None
