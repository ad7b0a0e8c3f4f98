"""Group DETR's training-time query groups (Chen et al., "Group DETR", 2022).

During training the decoder runs ``G`` groups of ``Q`` object queries side by side; the
self-attention of a query is restricted to its own group, and each group is matched to
the targets one-to-one on its own, so every target supervises ``G`` queries per layer
instead of one. Inference keeps the first group alone, which is plain DETR.

The groups are handled as extra images of the batch: the outputs of image ``b``, group
``g`` become batch entry ``b * G + g`` with a copy of image ``b``'s targets, so the
unchanged matcher and criterion apply. The criterion's box normaliser then counts every
target ``G`` times, i.e. the losses are averaged over the groups.
"""
import torch

__all__ = ["group_self_attention_mask", "groups_as_batch_entries"]


def group_self_attention_mask(num_groups, num_queries, device=None):
    """bool [G*Q, G*Q]: True where query i (row) may NOT attend to query j (column),
    i.e. outside the Q x Q diagonal blocks of its own group."""
    group_of_query = torch.arange(num_groups * num_queries, device=device) // num_queries
    return group_of_query[:, None] != group_of_query[None, :]


def groups_as_batch_entries(logits, boxes, targets, num_groups):
    """Turn query groups into batch entries.

    Args:
        logits: [L, B, G*Q, K+1]; boxes: [L, B, G*Q, 4] normalised cxcywh.
        targets: B dicts {"labels": [n], "boxes": [n, 4] normalised cxcywh}.
    Returns:
        logits [L, B*G, Q, K+1], boxes [L, B*G, Q, 4], targets (each repeated G times).
    """
    num_layers, batch, all_queries = logits.shape[:3]
    num_queries = all_queries // num_groups
    logits = logits.reshape(num_layers, batch * num_groups, num_queries, logits.shape[-1])
    boxes = boxes.reshape(num_layers, batch * num_groups, num_queries, 4)
    return logits, boxes, [target for target in targets for _ in range(num_groups)]
