"""Contrastive denoising queries (DINO's CDN; Zhang et al., ICLR 2023), training only.

Noised copies of the ground-truth boxes and labels join the decoder as extra queries in
front of the matching queries. They come in groups; each group holds a positive copy of
every target (small box noise: the query must reconstruct its target) and a negative copy
(larger box noise: the query must predict "no object"). An attention mask keeps the
matching queries from seeing any denoising query and each group from seeing the others.

Layout (P = ``pad_size`` = groups x 2 x the batch's largest target count ``n_max``):
group g occupies queries [2 g n_max, 2 (g+1) n_max): positives first, then negatives,
image i's targets at their index within each half (unused slots stay zero).
"""
from typing import NamedTuple, Optional

import torch

from detr_d2.modeling.box_ops import inverse_sigmoid

__all__ = ["DenoisingQueries", "denoising_attention_mask", "make_denoising_queries", "number_of_groups",
           "positive_query_indices"]


class DenoisingQueries(NamedTuple):
    """The denoising part of the decoder input.

    content [B, P, C] (label embeddings of the noised labels), boxes [B, P, 4] noised
    boxes as inverse-sigmoid cxcywh, attn_mask [P + Q, P + Q] bool (True: may not
    attend), num_groups, pad_size P. The reference's ``prepare_for_cdn`` returns the same
    (its input_query_label, input_query_bbox, attn_mask, dn_meta).
    """

    content: torch.Tensor
    boxes: torch.Tensor
    attn_mask: torch.Tensor
    num_groups: int
    pad_size: int


def number_of_groups(dn_number, largest_target_count):
    """Groups of the batch: ``2 * dn_number`` (positive + negative copies) shared out by the
    largest target count when ``2 * dn_number >= 100``, else ``2 * dn_number`` itself (the
    reference's rule); at least 1."""
    copies = dn_number * 2
    if largest_target_count == 0:
        return 1
    if copies >= 100:
        copies = copies // (largest_target_count * 2)
    return max(copies, 1)


def denoising_attention_mask(pad_size, num_groups, num_queries, device=None):
    """bool [P + Q, P + Q], True where a query (row) may not attend to another (column):
    matching queries never see denoising ones; a group sees no other group (it sees the
    matching queries)."""
    size = pad_size + num_queries
    index = torch.arange(size, device=device)
    group_size = pad_size // num_groups if num_groups else 0
    group = torch.where(index < pad_size, index // max(group_size, 1), -1)
    is_denoising = index < pad_size
    matching_row_sees_denoising = ~is_denoising[:, None] & is_denoising[None, :]
    other_group = is_denoising[:, None] & is_denoising[None, :] & (group[:, None] != group[None, :])
    return matching_row_sees_denoising | other_group


def _noised_labels(labels, ratio, num_classes, generator):
    """Each label replaced by a uniformly drawn class with probability ``ratio / 2``."""
    if ratio <= 0:
        return labels
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < ratio * 0.5
    random_labels = torch.randint(0, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, random_labels, labels)


def _noised_boxes(boxes, negative, scale, generator):
    """cxcywh [N, 4] -> cxcywh [N, 4]: each corner moved by up to ``scale`` x half the box
    size (positives: [0, 1) of it, negatives: [1, 2)), random sign, clamped to [0, 1]."""
    if scale <= 0:
        return boxes
    half = boxes[:, 2:] / 2
    corners = torch.cat([boxes[:, :2] - half, boxes[:, :2] + half], 1)
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=boxes.device).float() * 2.0 - 1.0
    magnitude = torch.rand(boxes.shape, generator=generator, device=boxes.device) + negative[:, None].float()
    corners = (corners + magnitude * sign * torch.cat([half, half], 1) * scale).clamp(0.0, 1.0)
    return torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1)


def make_denoising_queries(targets, label_embedding, num_queries, num_classes, dn_number=100,
                           label_noise_ratio=0.5, box_noise_scale=1.0, generator=None):
    """``DenoisingQueries`` for ``targets`` (per image {"labels": [n], "boxes": [n, 4]
    cxcywh normalised}); ``label_embedding``: the nn.Embedding of the (noised) labels (at
    least ``num_classes`` rows; noised labels are drawn among ``num_classes``); noise drawn
    from ``generator`` (torch's default when None)."""
    counts = [len(t["labels"]) for t in targets]
    largest = max(counts, default=0)
    groups = number_of_groups(dn_number, largest)
    device = label_embedding.weight.device
    labels = torch.cat([t["labels"] for t in targets]).to(device)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device)
    image_index = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
    slot = torch.cat([torch.arange(n, device=device) for n in counts])
    copies = 2 * groups
    negative = (torch.arange(copies, device=device) % 2 == 1).repeat_interleave(len(labels))
    noised_labels = _noised_labels(labels.repeat(copies), label_noise_ratio, num_classes, generator)
    noised_boxes = _noised_boxes(boxes.repeat(copies, 1), negative, box_noise_scale, generator)
    pad_size = largest * copies
    content = label_embedding.weight.new_zeros(len(targets), pad_size, label_embedding.embedding_dim)
    query_boxes = boxes.new_zeros(len(targets), pad_size, 4)
    query_slot = (slot.repeat(copies) + largest * torch.arange(copies, device=device).repeat_interleave(len(labels)))
    content[image_index.repeat(copies), query_slot] = label_embedding(noised_labels)
    query_boxes[image_index.repeat(copies), query_slot] = inverse_sigmoid(noised_boxes)
    mask = denoising_attention_mask(pad_size, groups, num_queries, device)
    return DenoisingQueries(content, query_boxes, mask, groups, pad_size)


def positive_query_indices(targets, num_groups, pad_size):
    """Per image (query indices, target indices) of the positive denoising queries: target
    j of every group g at query g * 2 n_max + j."""
    group_stride = pad_size // num_groups if num_groups else 0
    indices = []
    for target in targets:
        count = len(target["labels"])
        slots = torch.arange(count, dtype=torch.long)
        starts = torch.arange(num_groups, dtype=torch.long)[:, None] * group_stride
        indices.append(((starts + slots).flatten(), slots.repeat(num_groups)))
    return indices


def split_denoising(values, denoising: Optional[DenoisingQueries]):
    """[L, B, P + Q, ...] -> (matching part [L, B, Q, ...], denoising part [L, B, P, ...] or None)."""
    if denoising is None:
        return values, None
    return values[:, :, denoising.pad_size:], values[:, :, :denoising.pad_size]
