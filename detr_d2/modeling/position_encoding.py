"""Position embeddings of the feature map, as in the reference DETR.

Both take a padding mask ``[B, H, W]`` (True on padding) and return ``[B, 2 * num_pos_feats,
H, W]`` (``num_pos_feats`` = hidden_dim / 2).
"""
import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine embedding of the (y, x) position of each unpadded pixel.

    With ``normalize`` the cumulative coordinates (1..n, plus ``offset``) are divided by the
    unpadded extent of each image and scaled to [0, 2π], so an image's embedding does not
    depend on its padding. DETR uses offset 0; Deformable DETR and DINO use -0.5 (pixel
    centres).
    Channels: the first ``num_pos_feats`` encode y, the rest x; within each, sin and cos
    of a frequency alternate.
    """

    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True, scale=2 * math.pi, offset=0.0):
        super().__init__()
        self.offset = offset
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def _frequencies(self, device):
        index = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        return self.temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / self.num_pos_feats)

    def _encode(self, coordinate, frequencies):
        """[B, H, W] coordinates -> [B, H, W, num_pos_feats] interleaved sin/cos."""
        phase = coordinate[..., None] / frequencies
        return torch.stack((phase[..., 0::2].sin(), phase[..., 1::2].cos()), dim=4).flatten(3)

    def forward(self, mask):
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        frequencies = self._frequencies(mask.device)
        pos = torch.cat((self._encode(y_embed, frequencies), self._encode(x_embed, frequencies)), dim=3)
        return pos.permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute embedding: one vector per column (first half) and per row (second
    half), for feature maps of at most ``max_size`` x ``max_size``."""

    def __init__(self, num_pos_feats=128, max_size=50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask):
        batch, height, width = mask.shape
        x_emb = self.col_embed(torch.arange(width, device=mask.device))
        y_emb = self.row_embed(torch.arange(height, device=mask.device))
        pos = torch.cat((x_emb[None].expand(height, -1, -1), y_emb[:, None].expand(-1, width, -1)), dim=-1)
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)


def build_position_embedding(kind, hidden_dim):
    """``kind`` is MODEL.DETR.POSITION_EMBEDDING: "sine" or "learned"."""
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"MODEL.DETR.POSITION_EMBEDDING must be 'sine' or 'learned', got {kind!r}")
