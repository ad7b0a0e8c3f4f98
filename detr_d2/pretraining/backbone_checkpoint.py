"""The pretrained backbone as a checkpoint that a Detr model of the same config loads.

Keys are those the Detr model gives its backbone (``backbone.body.<name>``), without BN
``num_batches_tracked``, so detectron2's DetectionCheckpointer loads the file as
MODEL.WEIGHTS (the DETR keys it lacks are reported as missing) also into a FrozenBN
backbone.
"""
import os

from detectron2.modeling import build_model

from detr_d2.checkpoint import atomic_torch_save

DETR_BACKBONE_PREFIX = "backbone.body."


def backbone_checkpoint(backbone, prefix=DETR_BACKBONE_PREFIX):
    """The backbone's state dict under DETR's names, without BN ``num_batches_tracked``
    (which FrozenBN does not have)."""
    return {prefix + name: tensor.detach().clone()
            for name, tensor in backbone.state_dict().items()
            if not name.endswith("num_batches_tracked")}


def check_detr_names(cfg, backbone_state):
    """Raise if the keys/shapes don't match the backbone part of the config's Detr model."""
    detr_state = build_model(cfg).state_dict()
    expected = {k for k in detr_state if k.startswith(DETR_BACKBONE_PREFIX)}
    missing = sorted(expected - backbone_state.keys())
    unknown = sorted(backbone_state.keys() - expected)
    mismatched = sorted(k for k in expected & backbone_state.keys()
                        if detr_state[k].shape != backbone_state[k].shape)
    if missing or unknown or mismatched:
        raise RuntimeError(f"backbone keys do not match the Detr model of the config: missing "
                           f"{missing[:5]}, unexpected {unknown[:5]}, shape mismatch {mismatched[:5]}")


def save_backbone(path, backbone, facts):
    """Write ``{"model": backbone_checkpoint(backbone), "pretrain": facts}`` to ``path``
    atomically, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_torch_save({"model": backbone_checkpoint(backbone), "pretrain": facts}, path)
