"""Group DETR's training-time query groups (Chen et al., "Group DETR", 2022): ``GroupDetr``.

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
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from detr_d2.modeling.detr import Detr

__all__ = ["GroupDetr", "TRAINING_ONLY_TENSOR_PREFIXES", "group_self_attention_mask",
           "groups_as_batch_entries"]

# Parameters that exist for training only (the queries of groups 2..G); inference and slim
# checkpoints (tools/slim_checkpoint.py) do without them.
TRAINING_ONLY_TENSOR_PREFIXES = ("extra_query_embed.",)


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


@META_ARCH_REGISTRY.register()
class GroupDetr(Detr):
    """``Detr`` trained with MODEL.DETR.NUM_QUERY_GROUPS groups of queries; in eval mode it
    is ``Detr`` (the first group). ``extra_query_embed`` holds the queries of groups 2..G."""

    @configurable
    def __init__(self, *, num_query_groups, **detr_arguments):
        super().__init__(**detr_arguments)
        if num_query_groups < 1:
            raise ValueError(f"MODEL.DETR.NUM_QUERY_GROUPS must be at least 1, got {num_query_groups}")
        num_queries, hidden_dim = self.query_embed.weight.shape
        self.num_query_groups = num_query_groups
        self.extra_query_embed = nn.Embedding(num_queries * (num_query_groups - 1), hidden_dim)

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.MASK_ON:
            raise ValueError("MODEL.MASK_ON is not supported with query groups (MODEL.DETR.NUM_QUERY_GROUPS "
                             f"{cfg.MODEL.DETR.NUM_QUERY_GROUPS}); set MODEL.DETR.NUM_QUERY_GROUPS 1")
        return {**super().from_config(cfg), "num_query_groups": cfg.MODEL.DETR.NUM_QUERY_GROUPS}

    def queries(self):
        """In training, all G*Q queries, kept apart by the self-attention mask [G*Q, G*Q];
        in eval, the Q queries of the first group."""
        if not self.training or self.num_query_groups == 1:
            return super().queries()
        embeddings = torch.cat([self.query_embed.weight, self.extra_query_embed.weight])
        mask = group_self_attention_mask(self.num_query_groups, len(self.query_embed.weight),
                                         embeddings.device)
        return embeddings, mask

    def losses(self, logits, boxes, targets, mask_logits=None):
        """Each group matched and supervised on its own (as extra batch entries); there is
        no mask head (``from_config`` refuses MODEL.MASK_ON), so ``mask_logits`` is None."""
        return super().losses(*groups_as_batch_entries(logits, boxes, targets, self.num_query_groups))
