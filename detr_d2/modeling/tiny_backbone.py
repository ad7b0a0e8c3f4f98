"""A small plain CNN backbone for small images (e.g. the 128-px synthetic shapes).

``TinyCNN`` is a detectron2 ``Backbone`` with one output feature map: ``log2(STRIDE)``
stages, each starting with a stride-2 3x3 conv and followed by more 3x3 convs (conv,
norm, ReLU each), ``NUM_LAYERS`` convs in all; stage ``i`` (from 0) has ``WIDTH * 2**i``
channels. Width 32, 8 layers, stride 16 gives a 256-channel map at 1/16 of the input.

Config keys (``add_tiny_cnn_config``), used when ``MODEL.BACKBONE.NAME`` is
"build_tiny_cnn_backbone":

* ``MODEL.TINY_CNN.WIDTH``: channels of the first stage.
* ``MODEL.TINY_CNN.NUM_LAYERS``: number of conv layers (at least ``log2(STRIDE)``).
* ``MODEL.TINY_CNN.STRIDE``: output stride, a power of two >= 2.
* ``MODEL.TINY_CNN.NORM``: detectron2 norm name: "BN" (trainable statistics, used for
  pretraining), "FrozenBN" (fixed statistics and affine; the same state-dict keys, so a
  "BN" checkpoint loads into it), "GN", or "" (no norm, convs get a bias).
* ``MODEL.TINY_CNN.OUT_FEATURE``: name of the output (set ``MODEL.DETR.IN_FEATURE`` to it).
* ``MODEL.BACKBONE.FREEZE_AT``: number of stages (from the input) whose parameters are
  frozen and whose norms become FrozenBN; 0 freezes nothing, ``log2(STRIDE)`` everything.
"""
import math

from detectron2.config import CfgNode as CN
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

__all__ = ["TinyCNN", "add_tiny_cnn_config", "build_tiny_cnn_backbone", "tiny_cnn_stage_depths"]


def add_tiny_cnn_config(cfg):
    """Add the ``MODEL.TINY_CNN`` keys to ``cfg`` in place (no-op if already there)."""
    if "TINY_CNN" in cfg.MODEL:
        return cfg
    cfg.MODEL.TINY_CNN = CN()
    cfg.MODEL.TINY_CNN.WIDTH = 32
    cfg.MODEL.TINY_CNN.NUM_LAYERS = 8
    cfg.MODEL.TINY_CNN.STRIDE = 16
    cfg.MODEL.TINY_CNN.NORM = "BN"
    cfg.MODEL.TINY_CNN.OUT_FEATURE = "out"
    return cfg


def tiny_cnn_stage_depths(num_layers, stride):
    """Number of conv layers of each stage: ``log2(stride)`` stages, layers spread evenly,
    the remainder going to the last (deepest) stages. E.g. (8, 16) -> [2, 2, 2, 2],
    (8, 8) -> [2, 3, 3]."""
    num_stages = int(round(math.log2(stride))) if stride >= 2 else 0
    if stride < 2 or 2 ** num_stages != stride:
        raise ValueError(f"MODEL.TINY_CNN.STRIDE must be a power of two >= 2, got {stride}")
    if num_layers < num_stages:
        raise ValueError(f"MODEL.TINY_CNN.NUM_LAYERS ({num_layers}) must be at least "
                         f"log2(STRIDE) = {num_stages}, one stride-2 conv per stage")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if i >= num_stages - extra else 0) for i in range(num_stages)]


def _conv_norm_relu(in_channels, out_channels, stride, norm):
    """3x3 conv (bias only without norm) + norm + ReLU, as one detectron2 ``Conv2d``."""
    conv = Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1,
                  bias=not norm, norm=get_norm(norm, out_channels), activation=nn.ReLU(inplace=True))
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class TinyCNN(Backbone):
    """Plain conv stack; forward(x [B, C, H, W]) -> {out_feature: [B, C', ceil(H/s), ceil(W/s)]},
    with ``stage_outputs`` also {"stage<k>": output of stage k} for every stage but the last
    (stride 2**k, WIDTH * 2**(k-1) channels), the finer levels a mask head reads.

    Parameter names: ``stage<k>.<j>.weight`` (k from 1) and ``stage<k>.<j>.norm.*``.
    """

    def __init__(self, in_channels=3, width=32, num_layers=8, stride=16, norm="BN",
                 out_feature="out", freeze_at=0, stage_outputs=False):
        super().__init__()
        self.stage_names = []
        channels = in_channels
        for index, depth in enumerate(tiny_cnn_stage_depths(num_layers, stride)):
            out_channels = width * 2 ** index
            layers = [_conv_norm_relu(channels, out_channels, 2, norm)]
            layers += [_conv_norm_relu(out_channels, out_channels, 1, norm) for _ in range(depth - 1)]
            name = f"stage{index + 1}"
            self.add_module(name, nn.Sequential(*layers))
            self.stage_names.append(name)
            channels = out_channels
        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: channels}
        self._out_feature_strides = {out_feature: stride}
        if stage_outputs:
            for index, name in enumerate(self.stage_names[:-1]):
                self._out_features.append(name)
                self._out_feature_channels[name] = width * 2 ** index
                self._out_feature_strides[name] = 2 ** (index + 1)
        self.freeze(freeze_at)

    def freeze(self, freeze_at=0):
        """Freeze the first ``freeze_at`` stages: no gradients, norms turned to FrozenBN."""
        if not 0 <= freeze_at <= len(self.stage_names):
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT for the tiny CNN must be 0..{len(self.stage_names)} "
                             f"(number of frozen stages), got {freeze_at}")
        for name in self.stage_names[:freeze_at]:
            stage = getattr(self, name)
            for parameter in stage.parameters():
                parameter.requires_grad = False
            setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(stage))
        return self

    def forward(self, x):
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_feature_strides:
                outputs[name] = x
        outputs[self._out_features[0]] = x
        return outputs


@BACKBONE_REGISTRY.register()
def build_tiny_cnn_backbone(cfg, input_shape: ShapeSpec):
    """``TinyCNN`` from ``cfg.MODEL.TINY_CNN`` and ``cfg.MODEL.BACKBONE.FREEZE_AT``; with
    ``MODEL.MASK_ON``, or when MODEL.MULTI_SCALE.IN_FEATURES names a stage ("stage<k>"), it
    also returns its earlier stages (for the mask head, for the multi-scale neck)."""
    tiny = cfg.MODEL.TINY_CNN
    multi_scale_stages = any(name.startswith("stage") for name in cfg.MODEL.MULTI_SCALE.IN_FEATURES)
    return TinyCNN(in_channels=input_shape.channels, width=tiny.WIDTH, num_layers=tiny.NUM_LAYERS,
                   stride=tiny.STRIDE, norm=tiny.NORM, out_feature=tiny.OUT_FEATURE,
                   freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, stage_outputs=cfg.MODEL.MASK_ON or multi_scale_stages)
