"""DETR's encoder-decoder transformer (post-norm or pre-norm), in the reference's layout.

Sequences are sequence-first: ``[S, B, C]``. Parameter names equal the reference's
(``self_attn``, ``multihead_attn``, ``linear1/2``, ``norm1..3``, ``decoder.norm``), so its
checkpoints load without renaming. Attention is ``nn.MultiheadAttention``, dropout
``nn.Dropout``; ``detr_d2.acceleration`` may swap in faster equivalents.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn


def _with_pos(tensor, pos):
    return tensor if pos is None else tensor + pos


class _LayerWithFeedForward(nn.Module):
    """Shared part of both layer kinds: self-attention, the feed-forward block, ``num_norms``
    LayerNorms and their dropouts, under the reference's parameter names."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, pre_norm, num_norms):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        for i in range(1, num_norms + 1):
            setattr(self, f"norm{i}", nn.LayerNorm(d_model))
            setattr(self, f"dropout{i}", nn.Dropout(dropout))
        self.pre_norm = pre_norm

    def _feed_forward(self, x):
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(_LayerWithFeedForward):
    """Self-attention + feed-forward over the flattened feature map."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, pre_norm):
        super().__init__(d_model, nhead, dim_feedforward, dropout, pre_norm, num_norms=2)

    def _attend(self, src, padding_mask, pos):
        query = key = _with_pos(src, pos)
        return self.self_attn(query, key, value=src, key_padding_mask=padding_mask, need_weights=False)[0]

    def forward(self, src, padding_mask, pos):
        if self.pre_norm:
            src = src + self.dropout1(self._attend(self.norm1(src), padding_mask, pos))
            return src + self.dropout2(self._feed_forward(self.norm2(src)))
        src = self.norm1(src + self.dropout1(self._attend(src, padding_mask, pos)))
        return self.norm2(src + self.dropout2(self._feed_forward(src)))


class DecoderLayer(_LayerWithFeedForward):
    """Query self-attention, cross-attention to the encoder memory, feed-forward."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, pre_norm):
        super().__init__(d_model, nhead, dim_feedforward, dropout, pre_norm, num_norms=3)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)

    def _self_attend(self, tgt, query_pos, query_attn_mask):
        query = key = _with_pos(tgt, query_pos)
        return self.self_attn(query, key, value=tgt, attn_mask=query_attn_mask, need_weights=False)[0]

    def _cross_attend(self, tgt, memory, padding_mask, pos, query_pos):
        return self.multihead_attn(_with_pos(tgt, query_pos), _with_pos(memory, pos), value=memory,
                                   key_padding_mask=padding_mask, need_weights=False)[0]

    def forward(self, tgt, memory, padding_mask, pos, query_pos, query_attn_mask=None):
        if self.pre_norm:
            tgt = tgt + self.dropout1(self._self_attend(self.norm1(tgt), query_pos, query_attn_mask))
            tgt = tgt + self.dropout2(self._cross_attend(self.norm2(tgt), memory, padding_mask, pos, query_pos))
            return tgt + self.dropout3(self._feed_forward(self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self._self_attend(tgt, query_pos, query_attn_mask)))
        tgt = self.norm2(tgt + self.dropout2(self._cross_attend(tgt, memory, padding_mask, pos, query_pos)))
        return self.norm3(tgt + self.dropout3(self._feed_forward(tgt)))


class Encoder(nn.Module):
    """A stack of encoder layers, with a final LayerNorm in the pre-norm form only."""

    def __init__(self, layer, num_layers, norm):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src, padding_mask, pos):
        for layer in self.layers:
            src = layer(src, padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    """A stack of decoder layers; returns every layer's output after the shared final norm."""

    def __init__(self, layer, num_layers, norm):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, tgt, memory, padding_mask, pos, query_pos, query_attn_mask=None):
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, padding_mask, pos, query_pos, query_attn_mask)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    """Encoder over the image features, decoder over the object queries.

    forward(src [B, C, H, W], mask [B, H, W] (True on padding), query_embed [Q, C],
    pos_embed [B, C, H, W], optional query_attn_mask [Q, Q] bool (True: query i may not
    attend to query j)) -> decoder outputs [L, B, Q, C], one per decoder layer.
    """

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, pre_norm=False):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"MODEL.DETR.HIDDEN_DIM ({d_model}) must be divisible by "
                             f"MODEL.DETR.NHEADS ({nhead})")
        encoder_layer = EncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        decoder_layer = DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.encoder = Encoder(encoder_layer, num_encoder_layers, nn.LayerNorm(d_model) if pre_norm else None)
        self.decoder = Decoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self._reset_parameters()

    def _reset_parameters(self):
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, src, mask, query_embed, pos_embed, query_attn_mask=None):
        return self.encode_decode(src, mask, query_embed, pos_embed, query_attn_mask)[0]

    def encode_decode(self, src, mask, query_embed, pos_embed, query_attn_mask=None):
        """As ``forward``, also returning the encoder output: (decoder outputs [L, B, Q, C],
        memory [B, C, H, W])."""
        batch, channels, height, width = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).expand(-1, batch, -1)
        mask = mask.flatten(1)
        memory = self.encoder(src, mask, pos_embed)
        tgt = torch.zeros_like(query_pos)
        hidden = self.decoder(tgt, memory, mask, pos_embed, query_pos, query_attn_mask).transpose(1, 2)
        return hidden, memory.permute(1, 2, 0).view(batch, channels, height, width)
