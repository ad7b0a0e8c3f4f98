"""``FastMaskedBackbone``: ``MaskedBackbone`` whose body runs channels-last or prepacked.

With ``channels_last``, in eval mode the body runs on a channels-last copy of the batch
(oneDNN's preferred layout on the CPU; it carries through convolutions, pooling and
ReLU) and the features come out channels-last: the same values, another memory layout.
Training keeps the default layout (channels-last made the R50 training iteration slower,
docs/benchmark.md).
With ``prepacked`` (a ResNet that ``supports_prepacked_forward``), on the CPU the body runs
``prepacked_resnet_forward``: the whole body in eval without autograd, the frozen stem and
stages in training; the same values up to float rounding.
"""
import torch

from detr_d2.acceleration.prepacked_resnet import prepacked_prefix_length, prepacked_resnet_forward
from detr_d2.modeling.backbone import MaskedBackbone

__all__ = ["FastMaskedBackbone"]


class FastMaskedBackbone(MaskedBackbone):
    """The same module as ``MaskedBackbone`` (no state of its own), with a faster body
    forward while ``channels_last`` / ``prepacked`` are set (both off: ``MaskedBackbone``)."""

    channels_last = False
    prepacked = False

    def body_features(self, tensor):
        prefix_length = prepacked_prefix_length(self.body, tensor) if self.prepacked else 0
        if prefix_length:
            return prepacked_resnet_forward(self.body, tensor, prefix_length)
        if self.channels_last and not self.training:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return self.body(tensor)
