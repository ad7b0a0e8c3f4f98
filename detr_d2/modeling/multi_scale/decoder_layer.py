"""The decoder layer shared by Deformable DETR and DINO: self-attention among the queries,
deformable cross-attention into the encoder memory around each query's reference point,
FFN; each post-norm. The self-attention runs sequence-first, as the reference's. Parameter names follow the reference (``self_attn`` an
``nn.MultiheadAttention``, ``norm2``; ``cross_attn``, ``norm1``; ``linear1``, ``linear2``,
``norm3``)."""
from torch import nn

from detr_d2.modeling.multi_scale.deformable_attention import MultiScaleDeformableAttention
from detr_d2.modeling.multi_scale.encoder import feed_forward

__all__ = ["DeformableDecoderLayer"]


class DeformableDecoderLayer(nn.Module):
    """forward(tgt [B, Q, C], query_pos [B, Q, C], reference_points [B, Q, L, 2|4] (per level,
    scaled by the valid ratios), memory [B, S, C], spatial_shapes [L, 2], memory_mask [B, S]
    bool, self_attn_mask [Q, Q] bool (True: may not attend) or None, level_shapes (see
    ``FlatLevels``) or None) -> [B, Q, C]."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, memory_mask, self_attn_mask=None,
                level_shapes=None):
        query = (tgt + query_pos).transpose(0, 1)
        attended = self.self_attn(query, query, tgt.transpose(0, 1), attn_mask=self_attn_mask,
                                  need_weights=False)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attended))
        sampled = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_mask,
                                  level_shapes)
        tgt = self.norm1(tgt + self.dropout1(sampled))
        return feed_forward(tgt, self.linear1, self.linear2, self.dropout3, self.dropout4, self.norm3)
