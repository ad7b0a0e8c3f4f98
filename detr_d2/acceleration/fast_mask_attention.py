"""Multi-head attention whose attention-weight dropout uses ``fast_dropout`` in CPU training.

With dropout in training, ``nn.MultiheadAttention`` runs torch's reference ("math")
attention and draws the dropout mask of every [B*h, Lq, Lk] weight matrix with
``bernoulli_``; here the same computation is written out so that the mask comes from
``fast_dropout``. Parameters, their names and every other case (eval, no dropout, CUDA,
``fast_masks`` off, ``need_weights``) are ``nn.MultiheadAttention``'s own.
"""
import torch
import torch.nn.functional as F
from torch import nn

from detr_d2.acceleration.fast_dropout import fast_dropout, uses_fast_masks


def _split_heads(x, num_heads):
    """[L, B, E] -> [B * num_heads, L, E / num_heads]."""
    length, batch, embed = x.shape
    return x.reshape(length, batch * num_heads, embed // num_heads).transpose(0, 1)


def _blocked_positions(key_padding_mask, attn_mask, batch, lq, lk):
    """Bool mask broadcastable to [B, h, Lq, Lk] (True: may not attend), or None when no
    position is blocked."""
    blocked = None
    if key_padding_mask is not None and key_padding_mask.any():
        blocked = key_padding_mask.view(batch, 1, 1, lk)
    if attn_mask is not None:
        blocked = attn_mask if blocked is None else blocked | attn_mask
    return blocked


def attention(query, key, value, in_proj_weight, in_proj_bias, out_proj, num_heads,
              key_padding_mask=None, attn_mask=None, drop_weights=None):
    """Multi-head attention, sequence-first.

    query [Lq, B, E], key / value [Lk, B, E]; key_padding_mask bool [B, Lk] and attn_mask
    bool [Lq, Lk], True where attending is not allowed; ``drop_weights`` maps the softmax
    weights [B * h, Lq, Lk] to their dropped-out version (None: no dropout). Returns [Lq, B, E].
    """
    lq, batch, embed = query.shape
    lk = key.shape[0]
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3)
    head_dim = embed // num_heads
    q = _split_heads(F.linear(query, w_q, b_q), num_heads) * head_dim ** -0.5
    k = _split_heads(F.linear(key, w_k, b_k), num_heads)
    v = _split_heads(F.linear(value, w_v, b_v), num_heads)
    scores = torch.bmm(q, k.transpose(1, 2))
    blocked = _blocked_positions(key_padding_mask, attn_mask, batch, lq, lk)
    if blocked is not None:  # in place: bmm's backward does not need its output
        scores.view(batch, num_heads, lq, lk).masked_fill_(blocked, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if drop_weights is not None:
        weights = drop_weights(weights)
    attended = torch.bmm(weights, v).transpose(0, 1).reshape(lq, batch, embed)
    return out_proj(attended)


class FastMaskMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (sequence-first, bias, equal q/k/v sizes) that, in CPU
    training with dropout while ``fast_masks`` is True, drops attention weights with
    ``fast_dropout``."""

    fast_masks = True

    def _takes_fast_path(self, query, key_padding_mask, need_weights, attn_mask, is_causal):
        bool_masks = all(mask is None or mask.dtype == torch.bool for mask in (key_padding_mask, attn_mask))
        packed_projection = self._qkv_same_embed_dim and self.in_proj_bias is not None
        return (self.dropout > 0.0 and uses_fast_masks(self, query) and bool_masks and packed_projection
                and not (need_weights or is_causal or self.batch_first))

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self._takes_fast_path(query, key_padding_mask, need_weights, attn_mask, is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        output = attention(query, key, value, self.in_proj_weight, self.in_proj_bias, self.out_proj,
                           self.num_heads, key_padding_mask, attn_mask,
                           drop_weights=lambda weights: fast_dropout(weights, self.dropout))
        return output, None
