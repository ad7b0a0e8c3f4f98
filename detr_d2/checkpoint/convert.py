"""Conversion of reference DETR checkpoints (facebookresearch/detr) to detr_d2's layout.

Reference keys -> detr_d2 keys:
- ``backbone.0.body.*`` (torchvision ResNet) -> ``backbone.body.*`` (detectron2 ResNet:
  ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``, ``layer{i}.{j}.conv{k}`` ->
  ``res{i+1}.{j}.conv{k}``, ``bn{k}`` -> ``conv{k}.norm``, ``downsample.0/1`` ->
  ``shortcut``/``shortcut.norm``);
- ``backbone.1.*`` (learned position embedding) -> ``position_embedding.*``;
- transformer, heads, queries and input projection keep their names;
- segmentation checkpoints (``DETRsegm``): ``detr.*`` is the detection model (renamed as
  above), ``bbox_attention.*`` -> ``mask_head.attention_map.*``, ``mask_head.*`` ->
  ``mask_head.fpn.*``.
A 92-output COCO class head (category ids 0..90 + no-object) is reduced to detectron2's
80 contiguous COCO classes + no-object; a 251-output COCO-panoptic head (category ids
0..249 + no-object, the published panoptic models) to detectron2's 133 contiguous
COCO-panoptic classes (80 things + 53 stuff, the order of ``COCO_CATEGORIES``, as the
builtin ``coco_2017_*_panoptic`` metadata numbers them) + no-object. Other heads, and
every head with ``keep_classes``, are kept.
"""
import re

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from detr_d2.errors import SetupError

# COCO category ids in detectron2's contiguous order (= row of the reference class head).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)
COCO_HEAD_ROWS = COCO_CATEGORY_IDS + (91,)
REFERENCE_COCO_HEAD_SIZE = 92
# COCO-panoptic category ids (things and stuff) in detectron2's contiguous order, then the
# reference panoptic head's no-object row (num_classes 250).
COCO_PANOPTIC_HEAD_ROWS = tuple(category["id"] for category in COCO_CATEGORIES) + (250,)
REFERENCE_COCO_PANOPTIC_HEAD_SIZE = 251
# head size -> (rows kept, in detr_d2's order, no-object last; what the note calls them)
REMAPPED_HEADS = {
    REFERENCE_COCO_HEAD_SIZE: (COCO_HEAD_ROWS, "COCO class head remapped: 92 outputs -> 80 detectron2 classes"),
    REFERENCE_COCO_PANOPTIC_HEAD_SIZE: (COCO_PANOPTIC_HEAD_ROWS, "COCO-panoptic class head remapped: 251 outputs "
                                        "-> 133 detectron2 classes (80 things + 53 stuff; configs/detr_*_panoptic.yaml)"),
}
CLASS_HEAD_KEYS = ("class_embed.weight", "class_embed.bias")
# What every DETR detection checkpoint has besides its backbone, encoder and decoder layers.
REQUIRED_KEYS = ("query_embed.weight", "input_proj.weight", "input_proj.bias", "bbox_embed.layers.2.weight",
                 "transformer.decoder.norm.weight")
UNCHANGED_PREFIXES = ("transformer.", "class_embed.", "bbox_embed.", "query_embed.", "input_proj.")
SEGM_DETECTOR_PREFIX = "detr."
MASK_HEAD_PREFIXES = {"bbox_attention.": "mask_head.attention_map.", "mask_head.": "mask_head.fpn."}
BLOCK_COUNTS_TO_DEPTH = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
_BN_PARAMS = r"(weight|bias|running_mean|running_var)"
_RESNET_RULES = (
    (re.compile(r"^conv1\.weight$"), "stem.conv1.weight"),
    (re.compile(rf"^bn1\.{_BN_PARAMS}$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$"), lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(rf"^layer(\d)\.(\d+)\.bn(\d)\.{_BN_PARAMS}$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$"), lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (re.compile(rf"^layer(\d)\.(\d+)\.downsample\.1\.{_BN_PARAMS}$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
)


class ConversionError(SetupError, ValueError):
    """The input is not a reference DETR checkpoint this converter understands."""


def extract_state_dict(checkpoint, source):
    """The model state dict of a reference checkpoint: ``{"model": ...}`` as published, or
    with ``optimizer``/``lr_scheduler``/``epoch``/``args`` as the training script writes."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        keys = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(f"{source} is not a reference DETR checkpoint: expected a dict with a "
                              f"'model' state dict, found {keys}")
    state_dict = without_segm_detector_prefix(checkpoint["model"])
    if not any(k.startswith("transformer.") for k in state_dict) or "query_embed.weight" not in state_dict:
        raise ConversionError(f"{source} has no DETR transformer/query_embed tensors; first keys: "
                              f"{sorted(state_dict)[:8]}. Is it a DETR checkpoint?")
    return state_dict


def without_segm_detector_prefix(state_dict):
    """A segmentation checkpoint's ``detr.*`` keys without the prefix (others unchanged), so
    that its detection model reads like a detection checkpoint."""
    return {key[len(SEGM_DETECTOR_PREFIX):] if key.startswith(SEGM_DETECTOR_PREFIX) else key: value
            for key, value in state_dict.items()}


def resnet_depth(body_keys):
    """Depth (18/34/50/101/152) of a torchvision ResNet from its key names, or None."""
    counts = []
    for stage in range(1, 5):
        blocks = {int(m[1]) for k in body_keys if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(blocks))
    bottleneck = any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in body_keys)
    return BLOCK_COUNTS_TO_DEPTH.get((tuple(counts), bottleneck))


def rename_resnet_key(key):
    """torchvision ResNet key -> detectron2 ResNet key, or None if it matches no rule."""
    for pattern, replacement in _RESNET_RULES:
        match = pattern.match(key)
        if match:
            return replacement(match) if callable(replacement) else pattern.sub(replacement, key)
    return None


def rename_key(key):
    """Reference key -> detr_d2 key, or None for a key the converter does not know."""
    if key.startswith(UNCHANGED_PREFIXES):
        return key
    for prefix, replacement in MASK_HEAD_PREFIXES.items():
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    if key.startswith("backbone.1."):
        return "position_embedding." + key[len("backbone.1."):]
    if key.startswith("backbone.0.body."):
        if key.endswith("num_batches_tracked"):
            return ""
        renamed = rename_resnet_key(key[len("backbone.0.body."):])
        return None if renamed is None else "backbone.body." + renamed
    return None


def remap_class_head(state_dict, rows):
    """Keep the class-head ``rows`` (category ids in detectron2's contiguous order, then the
    no-object row) of the reference head: a 92-output COCO head -> 80 + 1 outputs
    (``COCO_HEAD_ROWS``), a 251-output COCO-panoptic head -> 133 + 1
    (``COCO_PANOPTIC_HEAD_ROWS``)."""
    for key in CLASS_HEAD_KEYS:
        state_dict[key] = state_dict[key][list(rows)].clone()


def _check_required_keys(state_dict, drop_class_head, source):
    """ConversionError naming ``source`` and the keys a DETR checkpoint lacks."""
    required = REQUIRED_KEYS + (() if drop_class_head else CLASS_HEAD_KEYS)
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ConversionError(f"{source}: a DETR checkpoint without {', '.join(missing)}: the file is truncated "
                              "or not a reference DETR checkpoint")


def convert_state_dict(reference, drop_class_head=False, source="checkpoint", keep_classes=False):
    """Reference state dict -> (detr_d2 state dict, report dict with depth and notes).
    ``keep_classes``: a COCO head kept as it is (else remapped, see the module docstring)."""
    body_keys = [k[len("backbone.0.body."):] for k in reference if k.startswith("backbone.0.body.")]
    depth = resnet_depth(body_keys)
    if depth is None:
        raise ConversionError(f"{source}: backbone is not a ResNet-18/34/50/101/152 in torchvision "
                              f"layout; backbone keys start {sorted(body_keys)[:6]}")
    renamed = {key: rename_key(key) for key in reference}
    unknown = sorted(k for k, v in renamed.items() if v is None)
    if unknown:
        raise ConversionError(f"{source}: keys the converter does not know: {unknown[:20]}"
                              f"{' ...' if len(unknown) > 20 else ''}")
    converted = {new: reference[old] for old, new in renamed.items() if new}
    _check_required_keys(converted, drop_class_head, source)
    head_size = converted["class_embed.weight"].shape[0] if "class_embed.weight" in converted else 0
    notes = [f"backbone ResNet-{depth} (dilation is not stored in weights: use a *_dc5 config for DC5)"]
    if any(key.startswith("mask_head.") for key in converted):
        notes.append("mask head (bbox_attention, mask_head) kept: load into a MODEL.MASK_ON config")
    if drop_class_head:
        for key in CLASS_HEAD_KEYS:
            converted.pop(key, None)
        notes.append(f"class head ({head_size} outputs) dropped for fine-tuning on other classes")
    elif head_size in REMAPPED_HEADS and not keep_classes:
        rows, description = REMAPPED_HEADS[head_size]
        remap_class_head(converted, rows)
        notes.append(f"{description} + no-object")
    else:
        notes.append(f"class head kept: {head_size - 1} classes + no-object"
                     f"{' (--keep-classes)' if keep_classes and head_size in REMAPPED_HEADS else ''}")
    return converted, {"depth": depth, "notes": notes}
