"""Panoptic segmentation from DETR's outputs: the reference's ``PostProcessPanoptic``.

For one image, from the class logits [Q, K+1] (the last column "no object") and the mask
logits [Q, h, w] of the mask head:

1. keep query q iff the argmax of its softmax over all K+1 outputs (no-object included)
   is not no-object and that probability (the segment's score) is > ``threshold``;
2. resize the kept queries' mask logits bilinearly (align_corners False) to the image's
   network input size; each pixel goes to the kept query with the largest logit (the
   first on ties);
3. in this first map, the pixels of every stuff class predicted by several kept queries
   are relabelled to the first of them;
4. resize the map to the requested output size with Pillow's nearest resize (the
   reference's: output pixel x reads input int(a_x), a_0 = in/out / 2, a_(x+1) = a_x +
   in/out; not torch's ``nearest``), and count each query's area there;
5. while some kept query has area <= 4, drop those and rebuild the map from the remaining
   queries (steps 2 and 4, without the merge of step 3: a merged duplicate, area 0, is
   simply dropped and its pixels go to the next best remaining query).

The result is in detectron2's panoptic format: segment ids 1..N in query order (the
reference numbers them 0..N-1; detectron2 keeps 0 for pixels of no segment, which here
happens only when no query is kept) and ``segments_info`` dicts with ``id``,
``category_id`` (contiguous class), ``isthing``, ``score`` and ``area``. Boxes are not used.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from detr_d2.modeling.float32 import float32_island
from detr_d2.modeling.postprocess import requested_size

# A kept query whose segment has at most this many pixels at the output size is dropped.
MAX_DROPPED_AREA = 4


def kept_queries(logits, threshold):
    """logits [Q, K+1] -> (keep bool [Q], scores [Q], labels [Q] int64): max and argmax of
    the softmax over all K+1 outputs; kept iff the label is not no-object (K) and the
    score is > ``threshold``."""
    scores, labels = logits.float().softmax(-1).max(-1)
    keep = labels.ne(logits.shape[-1] - 1) & (scores > threshold)
    return keep, scores, labels


def resized_mask_logits(mask_logits, image_size, padded_size=None):
    """Mask logits [N, h, w] covering ``padded_size`` (H', W') -> [N, H, W] at
    ``image_size`` (H, W): bilinear upsampling (align_corners False) to the padded size,
    then the image's top-left part. ``padded_size`` None (or equal to the image size): the
    whole map is resized to the image size, which is what the reference does even for an
    image padded in a batch (it squeezes the padding into the image)."""
    padded_size = tuple(image_size if padded_size is None else padded_size)
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0, *image_size))
    upsampled = F.interpolate(mask_logits[:, None].float(), size=padded_size, mode="bilinear",
                              align_corners=False)[:, 0]
    return upsampled[:, :image_size[0], :image_size[1]]


def query_index_map(mask_logits, merged_groups=()):
    """[N, H, W] mask logits -> int64 [H, W]: per pixel the index of the query with the
    largest logit (argmax of their softmax, the first on ties; 0 everywhere when N is 0).
    Each group of ``merged_groups`` (lists of query indices) is relabelled to its first."""
    if mask_logits.shape[0] == 0:
        return torch.zeros(mask_logits.shape[1:], dtype=torch.int64, device=mask_logits.device)
    index_map = mask_logits.softmax(0).argmax(0)
    for group in merged_groups:
        for index in group[1:]:
            index_map.masked_fill_(index_map.eq(index), group[0])
    return index_map


def pil_nearest_resize(index_map, output_size):
    """int64 [h, w] map (values < 2**31) -> int64 [H, W] resized to ``output_size`` (H, W)
    by Pillow's nearest-neighbour resize, on the CPU."""
    image = Image.fromarray(index_map.cpu().numpy().astype(np.int32))  # mode "I"
    height, width = output_size
    resized = image.resize((int(width), int(height)), resample=Image.NEAREST)
    return torch.from_numpy(np.asarray(resized, dtype=np.int32).astype(np.int64))


def stuff_duplicate_groups(labels, is_thing):
    """Kept labels [N] -> lists of kept indices sharing a stuff class, for classes predicted
    by more than one query (in query order)."""
    groups = {}
    for index, label in enumerate(labels.tolist()):
        if not is_thing[label]:
            groups.setdefault(label, []).append(index)
    return [group for group in groups.values() if len(group) > 1]


def output_index_map(mask_logits, output_size, merged_groups=()):
    """(index map [H, W] at ``output_size``, area per query [N]) of kept queries' mask
    logits [N, h', w'] at the network input size."""
    index_map = pil_nearest_resize(query_index_map(mask_logits, merged_groups), output_size)
    areas = torch.bincount(index_map.flatten(), minlength=mask_logits.shape[0])[:mask_logits.shape[0]]
    return index_map, areas


@float32_island
def panoptic_segmentation(logits, mask_logits, image_size, output_size, is_thing, threshold,
                          padded_size=None):
    """One image's panoptic segmentation, as the reference's ``PostProcessPanoptic``
    (in float32, also when the model runs under autocast).

    Args:
        logits: [Q, K+1] class logits (last column "no object").
        mask_logits: [Q, h, w] mask logits (the mask head's res2-size output).
        image_size: (H', W') of the image as the network saw it (unpadded).
        output_size: (H, W) to report the segmentation in.
        is_thing: sequence of K bools, True for the thing classes.
        threshold: score a kept query must exceed.
        padded_size: (H'', W'') that ``mask_logits`` cover (the padded batch); None: the
            image size (the reference's resizing, see ``resized_mask_logits``).

    Returns:
        (seg int32 [H, W] on the device of ``mask_logits``, segments_info): seg holds
        segment ids 1..N (0 only when no query is kept); segments_info lists per segment,
        in query order, {"id", "category_id", "isthing", "score", "area"}.
    """
    keep, scores, labels = kept_queries(logits, threshold)
    scores, labels = scores[keep], labels[keep]
    masks = resized_mask_logits(mask_logits[keep], image_size, padded_size)
    index_map, areas = output_index_map(masks, output_size, stuff_duplicate_groups(labels, is_thing))
    while len(labels) and bool((small := areas <= MAX_DROPPED_AREA).any()):
        scores, labels, masks = scores[~small], labels[~small], masks[~small]
        index_map, areas = output_index_map(masks, output_size)
    segments_info = [{"id": index + 1, "category_id": label, "isthing": bool(is_thing[label]),
                      "score": score, "area": area}
                     for index, (label, score, area) in enumerate(zip(labels.tolist(), scores.tolist(),
                                                                      areas.tolist()))]
    seg = (index_map + 1) if len(labels) else torch.zeros_like(index_map)
    return seg.to(device=mask_logits.device, dtype=torch.int32), segments_info


class PanopticPostProcess:
    """``panoptic_segmentation`` with the class roles and threshold of a model.

    Args:
        thing_classes: the contiguous class ids (0..K-1) that are things; others are stuff.
        num_classes: K.
        threshold: score a query must exceed to make a segment (MODEL.DETR.PANOPTIC_THRESHOLD).
    """

    def __init__(self, thing_classes, num_classes, threshold):
        things = set(thing_classes)
        self.is_thing = [c in things for c in range(num_classes)]
        self.threshold = threshold

    def __call__(self, logits, mask_logits, image_size, output_size, padded_size=None):
        """See ``panoptic_segmentation``: (seg int32 [H, W], segments_info)."""
        return panoptic_segmentation(logits, mask_logits, image_size, output_size, self.is_thing,
                                     self.threshold, padded_size)


def build_panoptic_postprocess(cfg, num_classes):
    """The ``PanopticPostProcess`` of MODEL.DETR.PANOPTIC_ON (None when off), with the
    thing classes of MODEL.DETR.PANOPTIC_THING_IDS (which ``engine.build_config`` fills in
    from the training data's metadata) and MODEL.DETR.PANOPTIC_THRESHOLD."""
    detr = cfg.MODEL.DETR
    if not detr.PANOPTIC_ON:
        return None
    if not cfg.MODEL.MASK_ON:
        raise ValueError("MODEL.DETR.PANOPTIC_ON needs MODEL.MASK_ON True (the segments are the mask "
                         "head's masks); add MODEL.MASK_ON True or remove MODEL.DETR.PANOPTIC_ON")
    if detr.PANOPTIC_THING_IDS is None:
        raise ValueError("MODEL.DETR.PANOPTIC_THING_IDS is unset: build the config with "
                         "detr_d2.engine.build_config (it takes the thing classes from DATASETS.TRAIN's "
                         "thing_dataset_id_to_contiguous_id metadata) or list the contiguous thing ids")
    outside = [c for c in detr.PANOPTIC_THING_IDS if not 0 <= c < num_classes]
    if outside:
        raise ValueError(f"MODEL.DETR.PANOPTIC_THING_IDS {list(detr.PANOPTIC_THING_IDS)} holds {outside}, "
                         f"outside the contiguous class ids 0..{num_classes - 1} of MODEL.DETR.NUM_CLASSES")
    return PanopticPostProcess(detr.PANOPTIC_THING_IDS, num_classes, detr.PANOPTIC_THRESHOLD)


def add_panoptic_segmentation(results, panoptic, logits, mask_logits, batched_inputs, image_sizes):
    """Add "panoptic_seg" to each image's result dict.

    logits [B, Q, K+1] and mask_logits [B, Q, h, w] (res2 size of the padded batch) of the
    last decoder layer; ``image_sizes`` the unpadded (H', W') of each image. Each image's
    mask logits are upsampled to the padded batch size and cropped to the image (as for
    ``pred_masks``; for an image alone, or the largest of a batch, the same as the
    reference), and the segmentation is given at the size the input asks for ("height",
    "width", else its network input size)."""
    padded_size = [max(size[d] for size in image_sizes) for d in (0, 1)]
    with torch.no_grad():
        for i, (result, inp, size) in enumerate(zip(results, batched_inputs, image_sizes)):
            result["panoptic_seg"] = panoptic(logits[i], mask_logits[i], size, requested_size(inp, size),
                                              padded_size)
    return results
