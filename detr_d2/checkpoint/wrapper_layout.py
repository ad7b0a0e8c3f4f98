"""Checkpoints of the reference DETR's own detectron2 wrapper (``d2/`` in facebookresearch/detr).

The wrapper's ``Detr`` holds the reference ``DETR`` module as ``self.detr``, whose backbone
is ``Joiner(MaskedBackbone(detectron2 ResNet), position embedding)``. Its files, those its
``d2/converter.py`` writes from a reference checkpoint and those its trainer saves
(detectron2 checkpoints: ``model``, maybe ``optimizer``, ``scheduler``, ``iteration``), name
every tensor under ``detr.``:

==========================================================  ===============================
wrapper key                                                  detr_d2 key
==========================================================  ===============================
``detr.backbone.0.backbone.<detectron2 ResNet name>``        ``backbone.body.<same name>``
``detr.transformer.*``, ``detr.class_embed.*``,              the same without ``detr.``
``detr.bbox_embed.layers.*``, ``detr.query_embed.weight``,
``detr.input_proj.*``
MODEL.MASK_ON (its ``DETRsegm`` wraps ``DETR`` once more):
``detr.detr.<detector key as above without detr.>``          as above
``detr.bbox_attention.*``                                    ``mask_head.attention_map.*``
``detr.mask_head.*``                                         ``mask_head.fpn.*``
==========================================================  ===============================

The detectron2 ResNet names (``stem.conv1``, ``res2.0.conv1.norm``, ``res3.0.shortcut``
...) are detr_d2's own. The class head is used as it is: the wrapper's converter already
reduced a 92-output COCO head to 80 classes + no-object.

Two quirks of the wrapper's converter are recognised: an early version filled the
no-object row of the reduced COCO head with the "person" row (``check_class_head`` warns),
and run on a segmentation checkpoint it nests the backbone keys as
``detr.backbone.0.backbone.[stem.]detr.<name>`` (read like the plain names).
"""
import re

from detr_d2.checkpoint.convert import ConversionError

__all__ = ["WRAPPER_BACKBONE", "is_wrapper_layout", "wrapper_key_to_detr_d2", "wrapper_to_detr_d2"]

WRAPPER_BACKBONE = "backbone.0.backbone."
_DETECTOR_PARTS = ("transformer.", "class_embed.", "bbox_embed.", "query_embed.", "input_proj.")
_MASK_PARTS = {"bbox_attention.": "mask_head.attention_map.", "mask_head.": "mask_head.fpn."}
_BACKBONE_NAME = re.compile(r"^(stem\.conv1\.|res[2-5]\.\d+\.(conv[1-3]|shortcut)\.)")
# backbone names the wrapper's converter nests when given a DETRsegm checkpoint
_NESTED = re.compile(r"^(stem\.)?detr\.(.*)$")


def is_wrapper_layout(state_dict):
    """Whether ``state_dict`` has the wrapper's keys: its backbone under
    ``detr.[detr.]backbone.0.backbone.``."""
    return any(key.startswith(("detr." + WRAPPER_BACKBONE, "detr.detr." + WRAPPER_BACKBONE)) for key in state_dict)


def _backbone_key(name):
    """detectron2 ResNet name inside the wrapper's backbone -> detr_d2 key, or None."""
    nested = _NESTED.match(name)
    if nested:  # the wrapper converter's "stem.detr.conv1.weight" / "detr.res2.0..."
        name = (nested[1] or "") + nested[2]
    if name.endswith("num_batches_tracked"):
        return ""
    return "backbone.body." + name if _BACKBONE_NAME.match(name) else None


def _detector_key(key):
    """A key of the wrapped reference ``DETR`` (without ``detr.``) -> detr_d2 key, "" for a
    tensor to drop, None if unknown."""
    if key.startswith(WRAPPER_BACKBONE):
        return _backbone_key(key[len(WRAPPER_BACKBONE):])
    if key.startswith(_DETECTOR_PARTS):
        return key
    return None


def wrapper_key_to_detr_d2(key, segmentation):
    """One wrapper key -> detr_d2 key ("" to drop, None if the wrapper has no such key)."""
    if not key.startswith("detr."):
        return None
    key = key[len("detr."):]
    if not segmentation:
        return _detector_key(key)
    if key.startswith("detr."):
        return _detector_key(key[len("detr."):])
    if key.startswith(WRAPPER_BACKBONE):  # the converter's nested segmentation backbone
        return _detector_key(key)
    for prefix, replacement in _MASK_PARTS.items():
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return None


def is_segmentation(state_dict):
    """MODEL.MASK_ON files nest the detector once more (``detr.detr.*``)."""
    return any(key.startswith("detr.detr.") for key in state_dict)


def wrapper_to_detr_d2(state_dict, source="checkpoint"):
    """Wrapper state dict -> (detr_d2 state dict, notes). ConversionError for keys the
    wrapper does not write (listing them)."""
    segmentation = is_segmentation(state_dict)
    renamed = {key: wrapper_key_to_detr_d2(key, segmentation) for key in state_dict}
    unknown = sorted(key for key, new in renamed.items() if new is None)
    if unknown:
        raise ConversionError(f"{source}: keys the reference wrapper's layout does not have: {unknown[:12]}"
                              f"{' ...' if len(unknown) > 12 else ''}")
    converted = {new: state_dict[old] for old, new in renamed.items() if new}
    notes = []
    if segmentation:
        notes.append("MODEL.MASK_ON layout (detr.detr.*, detr.bbox_attention.*, detr.mask_head.*)")
    notes.extend(check_class_head(converted))
    return converted, notes


def check_class_head(state_dict):
    """Warnings about the class head: an early version of the wrapper's converter copied
    the "person" row (row 0 after reduction) into the no-object row of a COCO head."""
    weight = state_dict.get("class_embed.weight")
    if weight is None or weight.shape[0] != 81:
        return []
    if weight[-1].equal(weight[0]) and state_dict["class_embed.bias"][-1].equal(state_dict["class_embed.bias"][0]):
        return ["WARNING: the no-object row of the class head equals the 'person' row: the file was written by "
                "an early version of the wrapper's converter, which lost the no-object weights. Convert the "
                "reference checkpoint itself with tools/convert_detr_checkpoint.py instead."]
    return []
