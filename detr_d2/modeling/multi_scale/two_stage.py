"""Two-stage query selection: every encoder position proposes a box, the best become the
decoder's reference boxes (Deformable DETR's two-stage variant; DINO's query selection).

A position of level l proposes the box centred on its cell with width = height =
0.05 * 2^l (normalised by the unpadded level size), in inverse-sigmoid space; positions
on padding, or whose box is not inside (0.01, 0.99) in every coordinate, propose nothing
(+inf) and their memory is zeroed before the proposal head.
"""
import math

import torch

__all__ = ["encoder_proposals", "box_sine_embedding"]

BASE_PROPOSAL_SIZE = 0.05
VALID_RANGE = (0.01, 0.99)


def _level_proposals(mask, level, height, width):
    """mask [B, h*w] of one level -> proposals [B, h*w, 4] normalised cxcywh."""
    batch = mask.shape[0]
    grid_mask = mask.view(batch, height, width)
    valid_height = (~grid_mask[:, :, 0]).sum(1)
    valid_width = (~grid_mask[:, 0, :]).sum(1)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=mask.device),
                          torch.arange(width, dtype=torch.float32, device=mask.device), indexing="ij")
    grid = torch.stack([x, y], -1)
    scale = torch.stack([valid_width, valid_height], 1).view(batch, 1, 1, 2)
    centres = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale
    sizes = torch.full_like(centres, BASE_PROPOSAL_SIZE * 2.0 ** level)
    return torch.cat([centres, sizes], -1).view(batch, -1, 4)


def encoder_proposals(memory, mask, level_shapes):
    """The encoder positions' proposals.

    Args:
        memory: [B, S, C] encoder output; mask: [B, S] bool (True on padding);
        level_shapes: [(H_l, W_l)] sizes (``FlatLevels.level_shapes``).
    Returns:
        (memory [B, S, C] zeroed where there is no proposal, proposals [B, S, 4]
        inverse-sigmoid cxcywh, +inf where there is none).
    """
    level_masks = mask.split([height * width for height, width in level_shapes], 1)
    proposals = torch.cat([_level_proposals(level_mask, level, height, width)
                           for level, (level_mask, (height, width)) in enumerate(zip(level_masks, level_shapes))], 1)
    low, high = VALID_RANGE
    valid = ((proposals > low) & (proposals < high)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(mask[..., None], float("inf")).masked_fill(~valid, float("inf"))
    memory = memory.masked_fill(mask[..., None], 0.0).masked_fill(~valid, 0.0)
    return memory, proposals


def box_sine_embedding(boxes, features_per_coordinate=128, temperature=10000):
    """boxes [..., D] (values in [0, 1]) -> [..., D * features_per_coordinate]: each
    coordinate times 2π through sin/cos of ``features_per_coordinate`` frequencies (sin
    and cos interleaved), coordinates one after another in their order."""
    index = torch.arange(features_per_coordinate, dtype=torch.float32, device=boxes.device)
    frequencies = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / features_per_coordinate)
    phase = boxes[..., None] * (2 * math.pi) / frequencies
    return torch.stack((phase[..., 0::2].sin(), phase[..., 1::2].cos()), dim=-1).flatten(-3)
