"""The throwaway dense head trained on top of a detectron2 backbone, and the two together."""
import torch
import torch.nn.functional as F
from torch import nn

from detr_d2.pretraining.centernet_targets import NUM_BOX_VALUES

HEAD_CHANNELS = 128
HEATMAP_PRIOR_BIAS = -2.19  # sigmoid(-2.19) ~ 0.1


class DenseHead(nn.Module):
    """3x3 conv to 128 channels -> ReLU -> 1x1 conv to (K heatmaps + 4 box values).

    forward(features [B, C, h, w]) -> (heatmap logits [B, K, h, w], box values
    [B, 4, h, w]); the heatmap biases start at -2.19 (initial score 0.1).
    """

    def __init__(self, in_channels, num_heatmaps):
        super().__init__()
        self.num_heatmaps = num_heatmaps
        self.hidden = nn.Conv2d(in_channels, HEAD_CHANNELS, 3, padding=1)
        self.out = nn.Conv2d(HEAD_CHANNELS, num_heatmaps + NUM_BOX_VALUES, 1)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():
            self.out.bias[:num_heatmaps] = HEATMAP_PRIOR_BIAS

    def forward(self, features):
        out = self.out(F.relu(self.hidden(features)))
        return out[:, :self.num_heatmaps], out[:, self.num_heatmaps:]


class DenseDetector(nn.Module):
    """Backbone + dense head on the backbone's ``in_feature`` map (stride ``self.stride``);
    forward(normalised images [B, 3, H, W]) -> the head's outputs."""

    def __init__(self, backbone, in_feature, num_heatmaps):
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        shape = backbone.output_shape()[in_feature]
        self.stride = shape.stride
        self.head = DenseHead(shape.channels, num_heatmaps)

    def forward(self, images):
        return self.head(self.backbone(images)[self.in_feature])
