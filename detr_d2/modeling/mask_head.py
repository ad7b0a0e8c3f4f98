"""DETR's instance mask head (the reference's ``DETRsegm`` parts): per-query attention maps
over the encoder memory and a small FPN-style convolution head that turns them into mask
logits at the res2 resolution.

``MaskHead`` holds both: ``attention_map`` (the reference's ``bbox_attention``) and
``fpn`` (the reference's ``mask_head``, ``MaskHeadSmallConv``).
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskHead", "mask_head_levels", "mask_head_size_problems"]

GROUP_NORM_GROUPS = 8
NUM_LEVELS = 3  # finer backbone levels the FPN steps add (res4, res3, res2 of a ResNet)


def mask_head_levels(shapes, in_feature):
    """Names of the ``NUM_LEVELS`` backbone outputs of ``shapes`` ({name: ShapeSpec}) below
    ``in_feature``, deepest first: res4, res3, res2 for a ResNet's res5 (dilated or not).
    Below: another output of at most its stride; deeper: larger stride, then (a dilated
    stage keeps its stride) more channels. Fewer if the backbone has fewer."""
    below = [name for name in shapes if name != in_feature and shapes[name].stride <= shapes[in_feature].stride]
    return sorted(below, key=lambda name: (-shapes[name].stride, -shapes[name].channels))[:NUM_LEVELS]


def mask_head_size_problems(hidden_dim, nheads):
    """Messages (empty when fine) for HIDDEN_DIM / NHEADS the head cannot use: its GroupNorms
    of 8 groups see HIDDEN_DIM + NHEADS channels first and HIDDEN_DIM / 16 last."""
    problems = []
    if (hidden_dim + nheads) % GROUP_NORM_GROUPS:
        problems.append(f"MODEL.DETR.HIDDEN_DIM + MODEL.DETR.NHEADS ({hidden_dim} + {nheads}) must be "
                        f"divisible by {GROUP_NORM_GROUPS} (the first GroupNorm of the mask head)")
    if hidden_dim < 128 or (hidden_dim // 16) % GROUP_NORM_GROUPS:
        problems.append(f"MODEL.DETR.HIDDEN_DIM ({hidden_dim}) // 16 must be a positive multiple of "
                        f"{GROUP_NORM_GROUPS} (the last GroupNorm of the mask head), e.g. 128 or 256")
    return problems


class AttentionMap(nn.Module):
    """Multi-head attention weights of each query over the positions of a feature map.

    forward(queries [N, D], memory [B, D, H, W], padding_mask [B, H, W] bool (True on
    padding), image_index [N] (the image of each query)) -> [N, heads, H, W]: a softmax per
    query jointly over heads x H x W (so one head's map does not sum to 1), zero on
    padding. No position embedding.
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.k_linear = nn.Linear(dim, dim)
        self.scale = float(dim / num_heads) ** -0.5
        for linear in (self.q_linear, self.k_linear):
            nn.init.zeros_(linear.bias)
            nn.init.xavier_uniform_(linear.weight)

    def forward(self, queries, memory, padding_mask, image_index):
        num_queries, dim = queries.shape
        head_dim = dim // self.num_heads
        q = self.q_linear(queries).view(num_queries, self.num_heads, head_dim)
        k = F.conv2d(memory, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        k = k.view(memory.shape[0], self.num_heads, head_dim, *memory.shape[-2:])[image_index]
        weights = torch.einsum("nhc,nhcyx->nhyx", q * self.scale, k)
        weights = weights.masked_fill(padding_mask[image_index][:, None], float("-inf"))
        return weights.flatten(1).softmax(-1).view(weights.shape)


def _conv_norm(in_channels, out_channels):
    """(3x3 convolution, GroupNorm of 8 groups) of ``out_channels``."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(GROUP_NORM_GROUPS, out_channels)


class FpnMaskConv(nn.Module):
    """The reference's ``MaskHeadSmallConv``: two conv-GN-ReLU at stride 32, then three
    steps each adding a 1x1 adapter of a finer backbone level to the nearest-upsampled
    map, conv-GN-ReLU; a final 3x3 conv to one channel.

    Channels: in_channels = hidden + heads, then hidden/2, /4, /8, /16, 1.
    forward(x [N, hidden + heads, h5, w5] one row per query, levels: [res4, res3, res2] each
    [B, C_l, h_l, w_l], image_index [N] (the image of each row)) -> mask logits
    [N, 1, h2, w2] (res2 size).
    """

    def __init__(self, in_channels, hidden_dim, level_channels):
        super().__init__()
        widths = [in_channels, hidden_dim // 2, hidden_dim // 4, hidden_dim // 8, hidden_dim // 16]
        self.lay1, self.gn1 = _conv_norm(widths[0], widths[0])
        self.lay2, self.gn2 = _conv_norm(widths[0], widths[1])
        self.lay3, self.gn3 = _conv_norm(widths[1], widths[2])
        self.lay4, self.gn4 = _conv_norm(widths[2], widths[3])
        self.lay5, self.gn5 = _conv_norm(widths[3], widths[4])
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(level_channels[0], widths[1], 1)
        self.adapter2 = nn.Conv2d(level_channels[1], widths[2], 1)
        self.adapter3 = nn.Conv2d(level_channels[2], widths[3], 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, x, levels, image_index):
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        steps = ((self.adapter1, self.lay3, self.gn3), (self.adapter2, self.lay4, self.gn4),
                 (self.adapter3, self.lay5, self.gn5))
        for level, (adapter, conv, norm) in zip(levels, steps):
            lateral = adapter(level)[image_index]
            x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        return self.out_lay(x)


class MaskHead(nn.Module):
    """Mask logits of the queries from the detector's intermediate results.

    forward(hidden [B, Q, D] last decoder layer, memory [B, D, h5, w5] encoder output,
    projected [B, D, h5, w5] = input_proj(res5), padding_mask [B, h5, w5] bool,
    levels {name: [B, C, h, w]} holding ``level_names``, e.g. res4, res3, res2,
    positions=None) -> mask logits at the size of the finest level (res2) of the padded
    batch (no sigmoid): [B, Q, h2, w2] for every query, or with ``positions`` = (image
    index [N], query index [N]) [N, h2, w2] for those queries only (each query's mask
    depends on no other query, so they are the same values).
    """

    def __init__(self, hidden_dim, num_heads, level_names, level_channels):
        super().__init__()
        problems = mask_head_size_problems(hidden_dim, num_heads)
        if problems:
            raise ValueError("; ".join(problems))
        self.level_names = list(level_names)
        self.attention_map = AttentionMap(hidden_dim, num_heads)
        self.fpn = FpnMaskConv(hidden_dim + num_heads, hidden_dim, level_channels)

    def forward(self, hidden, memory, projected, padding_mask, levels, positions=None):
        batch, num_queries = hidden.shape[:2]
        if positions is None:
            queries = torch.arange(num_queries, device=hidden.device)
            image_index, query_index = torch.arange(batch, device=hidden.device).repeat_interleave(num_queries), queries.repeat(batch)
        else:
            image_index, query_index = positions
        maps = self.attention_map(hidden[image_index, query_index], memory, padding_mask, image_index)
        x = torch.cat([projected[image_index], maps], dim=1)
        logits = self.fpn(x, [levels[name] for name in self.level_names], image_index)[:, 0]
        return logits if positions is not None else logits.view(batch, num_queries, *logits.shape[-2:])
