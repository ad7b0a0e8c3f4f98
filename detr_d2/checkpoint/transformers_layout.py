"""Hugging Face transformers DETR models (``DetrForObjectDetection``, ``DetrForSegmentation``)
<-> detr_d2, as plain state-dict mapping and json: transformers itself is not needed.

Key names are those of the files transformers writes (``save_pretrained``) and of the Hub;
the names of transformers 5's modules (``o_proj``, ``mlp.fc1``, ``backbone.model``,
``conv1.conv`` ... of the mask head) are read too. ``P`` below is ``""`` for
``DetrForObjectDetection`` and ``"detr."`` for ``DetrForSegmentation``.

=======================================================  =====================================
transformers                                              detr_d2
=======================================================  =====================================
``P model.backbone.conv_encoder.model.<timm ResNet>``     ``backbone.body.<detectron2 ResNet>``
  (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0/1``: torchvision's names)
``P model.backbone.conv_encoder.model.<ResNetBackbone>``  ``backbone.body.<detectron2 ResNet>``
  (``embedder.embedder.convolution``, ``encoder.stages.S.layers.B.layer.K.convolution``,
  ``.normalization``, ``.shortcut.convolution``: transformers' own ResNet)
``P model.input_projection``                              ``input_proj``
``P model.query_position_embeddings.weight``              ``query_embed.weight``
``P model.{encoder,decoder}.layers.N.self_attn.{q,k,v}_proj``  ``transformer.*.self_attn.in_proj_*``
  (three Linear layers; nn.MultiheadAttention packs them as one [3C, C] in q, k, v order)
``...self_attn.out_proj``                                 ``...self_attn.out_proj``
``P model.decoder.layers.N.encoder_attn.*``               ``...multihead_attn.*`` (the same split)
``self_attn_layer_norm``, ``encoder_attn_layer_norm``,    ``norm1``, ``norm2`` (decoder),
``final_layer_norm``                                      ``norm2`` (encoder) / ``norm3`` (decoder)
``fc1``, ``fc2``                                          ``linear1``, ``linear2``
``P model.decoder.layernorm``                             ``transformer.decoder.norm``
``P class_labels_classifier``                             ``class_embed``
``P bbox_predictor.layers.{0,1,2}``                       ``bbox_embed.layers.{0,1,2}``
``P model.[backbone.]position_embedding.{row,column}_embeddings``  ``position_embedding.{row,col}_embed``
``bbox_attention.{q,k}_linear``                           ``mask_head.attention_map.{q,k}_linear``
``mask_head.{lay1..5,gn1..5,adapter1..3,out_lay}``        ``mask_head.fpn.<same>``
=======================================================  =====================================

What the two compute alike (checked against transformers' source and by the tests): post-
norm layers, the position embedding added to queries and keys (not values) in every
attention, the decoder's shared final LayerNorm, the normalised sine embedding (scale 2π,
temperature 10000, y channels first), frozen batch norm with eps 1e-5 (detectron2's
FrozenBatchNorm2d and transformers' DetrFrozenBatchNorm2d), padding masks resized by
nearest neighbour. transformers has no pre-norm DETR; with ``auxiliary_loss`` True its
decoder feeds each layer the normalised output of the previous one (and normalises the
last twice), which the reference does not: written configs set it False.
"""
import re

import torch

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from detr_d2.checkpoint import convert
from detr_d2.checkpoint.convert import BLOCK_COUNTS_TO_DEPTH, CLASS_HEAD_KEYS, ConversionError, rename_resnet_key

__all__ = ["HF_BACKBONE", "detr_d2_to_transformers", "is_transformers_layout", "resnet_spec",
           "transformers_to_detr_d2", "class_head_and_names"]

HF_BACKBONE = "model.backbone.conv_encoder.model."
SEGM_PREFIX = "detr."
TIMM, TRANSFORMERS_RESNET = "timm", "transformers"
_BN = r"(weight|bias|running_mean|running_var)"

# transformers 5 module names -> the names its files use
_V5_NAMES = (
    (re.compile(r"^((?:detr\.)?model\.backbone\.)model\."), r"\1conv_encoder.model."),
    (re.compile(r"\.o_proj\."), ".out_proj."),
    (re.compile(r"layers\.(\d+)\.mlp\.fc([12])\."), r"layers.\1.fc\2."),
    (re.compile(r"^bbox_attention\.q_proj\."), "bbox_attention.q_linear."),
    (re.compile(r"^bbox_attention\.k_proj\."), "bbox_attention.k_linear."),
    (re.compile(r"^mask_head\.conv([12])\.conv\."), r"mask_head.lay\1."),
    (re.compile(r"^mask_head\.conv([12])\.norm\."), r"mask_head.gn\1."),
    (re.compile(r"^mask_head\.fpn_stages\.(\d)\.fpn_adapter\."), lambda m: f"mask_head.adapter{int(m[1]) + 1}."),
    (re.compile(r"^mask_head\.fpn_stages\.(\d)\.refine\.conv\."), lambda m: f"mask_head.lay{int(m[1]) + 3}."),
    (re.compile(r"^mask_head\.fpn_stages\.(\d)\.refine\.norm\."), lambda m: f"mask_head.gn{int(m[1]) + 3}."),
    (re.compile(r"^mask_head\.output_conv\."), "mask_head.out_lay."),
)
_FINAL_NORM = {"encoder": "norm2", "decoder": "norm3"}


def _layer_parts(stack):
    """transformers name -> detr_d2 name of the non-attention-input parts of a layer."""
    parts = {"self_attn.out_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm1", "fc1": "linear1",
             "fc2": "linear2", "final_layer_norm": _FINAL_NORM[stack]}
    if stack == "decoder":
        parts.update({"encoder_attn.out_proj": "multihead_attn.out_proj", "encoder_attn_layer_norm": "norm2"})
    return parts


_QKV = ("q", "k", "v")
_TOP_LEVEL = {
    "model.input_projection.": "input_proj.",
    "model.query_position_embeddings.": "query_embed.",
    "model.decoder.layernorm.": "transformer.decoder.norm.",
    "class_labels_classifier.": "class_embed.",
    "bbox_predictor.": "bbox_embed.",
    "model.position_embedding.row_embeddings.": "position_embedding.row_embed.",
    "model.position_embedding.column_embeddings.": "position_embedding.col_embed.",
    "model.backbone.position_embedding.row_embeddings.": "position_embedding.row_embed.",
    "model.backbone.position_embedding.column_embeddings.": "position_embedding.col_embed.",
}
_MASK_PARTS = {"bbox_attention.": "mask_head.attention_map.", "mask_head.": "mask_head.fpn."}
_HF_RESNET_RULES = (
    (re.compile(r"^embedder\.embedder\.convolution\.weight$"), lambda m: "stem.conv1.weight"),
    (re.compile(rf"^embedder\.embedder\.normalization\.{_BN}$"), lambda m: f"stem.conv1.norm.{m[1]}"),
    (re.compile(r"^encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.weight$"),
     lambda m: f"res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.weight"),
    (re.compile(rf"^encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.{_BN}$"),
     lambda m: f"res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.norm.{m[4]}"),
    (re.compile(r"^encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.weight$"),
     lambda m: f"res{int(m[1]) + 2}.{m[2]}.shortcut.weight"),
    (re.compile(rf"^encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.{_BN}$"),
     lambda m: f"res{int(m[1]) + 2}.{m[2]}.shortcut.norm.{m[3]}"),
)
_D2_RESNET = re.compile(rf"^(?:stem\.conv1|res(\d)\.(\d+)\.(conv\d|shortcut))\.(?:weight|norm\.{_BN})$")


# ---------------------------------------------------------------- recognising
def is_transformers_layout(state_dict):
    """Whether ``state_dict`` has transformers DETR keys (its heads or its ``model.`` parts)."""
    return any(key.startswith(prefix + part) for key in state_dict for prefix in ("", SEGM_PREFIX)
               for part in ("class_labels_classifier.", "bbox_predictor.", "model.query_position_embeddings.",
                            "model.backbone.conv_encoder.", "model.input_projection."))


def with_file_names(state_dict):
    """transformers 5 module names replaced by the names its files use (others unchanged)."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in _V5_NAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed


# ---------------------------------------------------------------- transformers -> detr_d2
def backbone_flavour(backbone_names):
    """"transformers" for transformers' ResNetBackbone names, else "timm"."""
    return TRANSFORMERS_RESNET if any(n.startswith(("embedder.", "encoder.stages.")) for n in backbone_names) else TIMM


def _backbone_key(name, flavour):
    if name.endswith("num_batches_tracked"):
        return ""
    if flavour == TIMM:
        renamed = rename_resnet_key(name)
    else:
        renamed = next((rule(m) for pattern, rule in _HF_RESNET_RULES if (m := pattern.match(name))), None)
    return None if renamed is None else "backbone.body." + renamed


def _layer_key(stack, rest):
    """Key inside ``model.{encoder,decoder}.layers.N.`` -> (detr_d2 part, qkv slot or None)."""
    attentions = (("self_attn", "self_attn"), ("encoder_attn", "multihead_attn"))[:2 if stack == "decoder" else 1]
    for attention, ours in attentions:
        match = re.match(rf"^{attention}\.([qkv])_proj\.(weight|bias)$", rest)
        if match:
            return f"{ours}.in_proj_{match[2]}", _QKV.index(match[1])
    for part, ours in _layer_parts(stack).items():
        if rest.startswith(part + "."):
            return ours + rest[len(part):], None
    return None, None


def _detector_key(key, flavour):
    """Key of ``DetrForObjectDetection`` -> (detr_d2 key or "" / None, qkv slot)."""
    if key.startswith(HF_BACKBONE):
        return _backbone_key(key[len(HF_BACKBONE):], flavour), None
    for prefix, ours in _TOP_LEVEL.items():
        if key.startswith(prefix):
            return ours + key[len(prefix):], None
    match = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", key)
    if match:
        part, slot = _layer_key(match[1], match[3])
        return (None if part is None else f"transformer.{match[1]}.layers.{match[2]}.{part}"), slot
    return None, None


def transformers_key(key, flavour, segmentation):
    """One transformers key (file names) -> (detr_d2 key, "" to drop or None if unknown; qkv slot)."""
    if not segmentation:
        return _detector_key(key, flavour)
    if key.startswith(SEGM_PREFIX):
        return _detector_key(key[len(SEGM_PREFIX):], flavour)
    for prefix, ours in _MASK_PARTS.items():
        if key.startswith(prefix):
            return ours + key[len(prefix):], None
    return None, None


def is_segmentation(state_dict):
    """``DetrForSegmentation`` holds the detector as ``detr.`` beside its mask head."""
    return any(key.startswith(("detr.model.", "detr.class_labels_classifier.", "bbox_attention.")) for key in state_dict)


def transformers_to_detr_d2(state_dict, source="checkpoint"):
    """transformers DETR state dict -> (detr_d2 state dict, facts): facts has
    ``segmentation`` (bool) and ``backbone`` ("timm" or "transformers")."""
    state_dict = with_file_names(state_dict)
    segmentation = is_segmentation(state_dict)
    prefix = (SEGM_PREFIX if segmentation else "") + HF_BACKBONE
    flavour = backbone_flavour([k[len(prefix):] for k in state_dict if k.startswith(prefix)])
    converted, packed, unknown = {}, {}, []
    for key, value in state_dict.items():
        new, slot = transformers_key(key, flavour, segmentation)
        if new is None:
            unknown.append(key)
        elif slot is not None:
            packed.setdefault(new, [None] * 3)[slot] = value
        elif new:
            converted[new] = value
    if unknown:
        raise ConversionError(f"{source}: keys of no transformers DETR tensor this converter knows: "
                              f"{sorted(unknown)[:12]}{' ...' if len(unknown) > 12 else ''}")
    for key, parts in packed.items():
        if any(part is None for part in parts):
            missing = [name for name, part in zip(_QKV, parts) if part is None]
            raise ConversionError(f"{source}: {key} lacks the {', '.join(missing)} projection(s)")
        converted[key] = torch.cat(parts, dim=0)
    return converted, {"segmentation": segmentation, "backbone": flavour}


# ---------------------------------------------------------------- detr_d2 -> transformers
def _backbone_to_hf(name, flavour):
    """detectron2 ResNet name -> timm or transformers ResNet name."""
    match = re.match(rf"^res(\d)\.(\d+)\.(conv(\d)|shortcut)\.(weight|norm\.{_BN})$", name)
    stem = re.match(rf"^stem\.conv1\.(weight|norm\.{_BN})$", name)
    if flavour == TIMM:
        if stem:
            return "conv1.weight" if stem[1] == "weight" else f"bn1.{stem[2]}"
        stage, block, conv, index, param, bn = match[1], match[2], match[3], match[4], match[5], match[6]
        base = f"layer{int(stage) - 1}.{block}."
        if conv == "shortcut":
            return base + ("downsample.0.weight" if param == "weight" else f"downsample.1.{bn}")
        return base + (f"conv{index}.weight" if param == "weight" else f"bn{index}.{bn}")
    if stem:
        return "embedder.embedder." + ("convolution.weight" if stem[1] == "weight" else f"normalization.{stem[2]}")
    stage, block, conv, index, param, bn = match[1], match[2], match[3], match[4], match[5], match[6]
    base = f"encoder.stages.{int(stage) - 2}.layers.{block}."
    part = "shortcut." if conv == "shortcut" else f"layer.{int(index) - 1}."
    return base + part + ("convolution.weight" if param == "weight" else f"normalization.{bn}")


def _inverse_layer_parts(stack):
    return {ours: theirs for theirs, ours in _layer_parts(stack).items()}


def _transformer_to_hf(key, value):
    """``transformer.*`` key -> [(transformers key, tensor)] (an in_proj gives three)."""
    if key.startswith("transformer.decoder.norm."):
        return [("model.decoder.layernorm." + key[len("transformer.decoder.norm."):], value)]
    match = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", key)
    if not match:
        return None
    stack, index, rest = match[1], match[2], match[3]
    base = f"model.{stack}.layers.{index}."
    packed = re.match(r"^(self_attn|multihead_attn)\.in_proj_(weight|bias)$", rest)
    if packed:
        attention = "self_attn" if packed[1] == "self_attn" else "encoder_attn"
        return [(f"{base}{attention}.{name}_proj.{packed[2]}", chunk.clone())
                for name, chunk in zip(_QKV, value.chunk(3, dim=0))]
    for ours, theirs in _inverse_layer_parts(stack).items():
        if rest.startswith(ours + "."):
            return [(base + theirs + rest[len(ours):], value)]
    return None


def detr_d2_to_transformers(state_dict, segmentation, flavour=TIMM):
    """detr_d2 state dict -> transformers state dict (the names its files use).

    Tensors that only training uses (Group DETR's extra queries) are left out; a tensor of
    no transformers DETR module is a ConversionError.
    """
    prefix = SEGM_PREFIX if segmentation else ""
    inverse_top = {ours: theirs for theirs, ours in _TOP_LEVEL.items() if "backbone.position" not in theirs}
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith(("extra_query_embed.", "pixel_mean", "pixel_std")):
            continue
        if key.startswith("backbone.body."):
            name = key[len("backbone.body."):]
            if not _D2_RESNET.match(name):
                unknown.append(key)
                continue
            out[prefix + HF_BACKBONE + _backbone_to_hf(name, flavour)] = value
            continue
        if key.startswith("mask_head."):
            mask = next(((theirs + key[len(ours):]) for theirs, ours in _MASK_PARTS.items() if key.startswith(ours)), None)
            if mask is None or not segmentation:
                unknown.append(key)
            else:
                out[mask] = value
            continue
        top = next((theirs + key[len(ours):] for ours, theirs in inverse_top.items() if key.startswith(ours)), None)
        pairs = [(top, value)] if top else _transformer_to_hf(key, value)
        if pairs is None:
            unknown.append(key)
            continue
        out.update((prefix + name, tensor) for name, tensor in pairs)
    if unknown:
        raise ConversionError(f"tensors of no transformers DETR module: {sorted(unknown)[:10]}")
    return out


# ---------------------------------------------------------------- the ResNet from its weights
def resnet_spec(state_dict):
    """The detectron2 ResNet of detr_d2 weights: {"depth", "stem_out_channels",
    "res2_out_channels", "width_per_group", "bottleneck"}; ConversionError if it is none
    detectron2 builds (depth 18/34/50/101/152)."""
    names = [k[len("backbone.body."):] for k in state_dict if k.startswith("backbone.body.")]
    counts = tuple(len({int(m[1]) for n in names if (m := re.match(rf"res{s}\.(\d+)\.", n))}) for s in range(2, 6))
    bottleneck = any(re.match(r"res\d\.\d+\.conv3\.", n) for n in names)
    depth = BLOCK_COUNTS_TO_DEPTH.get((counts, bottleneck))
    if depth is None or "backbone.body.stem.conv1.weight" not in state_dict:
        raise ConversionError(f"the backbone is no ResNet-18/34/50/101/152 (blocks per stage {counts}, "
                              f"{'bottleneck' if bottleneck else 'basic'} blocks)")
    last = "conv3" if bottleneck else "conv2"
    return {
        "depth": depth,
        "bottleneck": bottleneck,
        "stem_out_channels": state_dict["backbone.body.stem.conv1.weight"].shape[0],
        "res2_out_channels": state_dict[f"backbone.body.res2.0.{last}.weight"].shape[0],
        "width_per_group": state_dict["backbone.body.res2.0.conv1.weight"].shape[0] if bottleneck else 64,
        "stage_channels": [state_dict[f"backbone.body.res{s}.0.{last}.weight"].shape[0] for s in range(2, 6)],
        "blocks_per_stage": list(counts),
    }


# ---------------------------------------------------------------- classes
def remapped_heads():
    """{head rows: (rows kept in detectron2's order, no-object last; note)}: the COCO heads
    the reference converter reduces (92 outputs; 251 for COCO panoptic where it does)."""
    default = {convert.REFERENCE_COCO_HEAD_SIZE: (
        convert.COCO_HEAD_ROWS, "COCO class head remapped: 92 outputs -> 80 detectron2 classes")}
    return getattr(convert, "REMAPPED_HEADS", default)


def is_dataset_label_map(id2label, rows):
    """Whether ``id2label`` ({int id: name}) numbers a head's outputs by the category ids of
    ``rows`` (the kept rows, no-object last): every such id named (or no labels at all), every
    other id "N/A", as transformers' ports of the COCO models have them."""
    if not id2label:
        return True
    kept = set(rows[:-1])
    return kept <= set(id2label) and all(str(name).upper() == "N/A" for i, name in id2label.items() if i not in kept)


def class_head_and_names(state_dict, id2label, remap=True):
    """Reduce a COCO head (92 outputs, COCO ids 0..90; 251 COCO-panoptic outputs) to
    detectron2's contiguous classes + no-object as the reference converter does, when the
    labels are those ids and ``remap``; give the class names and dataset ids: (names, ids, note)."""
    rows = state_dict["class_embed.weight"].shape[0]
    id2label = {int(i): name for i, name in (id2label or {}).items()}
    known = remapped_heads().get(rows) if remap else None
    if known and is_dataset_label_map(id2label, known[0]):
        kept, note = known
        for key in CLASS_HEAD_KEYS:
            state_dict[key] = state_dict[key][list(kept)].clone()
        coco_names = {category["id"]: category["name"] for category in COCO_CATEGORIES}
        ids = list(kept[:-1])
        return [id2label.get(i) or coco_names[i] for i in ids], ids, f"{note} + no-object"
    names = [id2label.get(i, f"LABEL_{i}") for i in range(rows - 1)]
    return names, list(range(rows - 1)), f"class head kept: {rows - 1} classes + no-object"
