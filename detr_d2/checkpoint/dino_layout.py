"""Checkpoints of the reference DINO (IDEA-Research/DINO): their tensors under detr_d2's
names, and the config of the ``Dino`` model they hold.

Names: the backbone as for Deformable DETR (``backbone.0.body.*`` -> detectron2's
``backbone.body.*``, batch-norm counters left out); the reference's aliases of the heads
inside its decoder (``transformer.decoder.class_embed.N`` / ``transformer.decoder.bbox_embed.N``,
the same tensors as ``class_embed.N`` / ``bbox_embed.N``) left out once checked equal to
them; every other key keeps its name: ``transformer.level_embed``,
``transformer.encoder.layers.N``, ``transformer.decoder.layers.N``, ``transformer.decoder.norm``,
``transformer.decoder.ref_point_head`` (the query position MLP), ``transformer.tgt_embed``
(content queries), ``transformer.enc_output(_norm)``, ``transformer.enc_out_class_embed`` /
``transformer.enc_out_bbox_embed`` (the query selection's heads), ``label_enc`` (the
denoising queries' label embeddings), ``class_embed.N`` / ``bbox_embed.N`` (one per decoder
layer), ``input_proj.N``.

Recognised by a torchvision backbone (``backbone.0.body.*``) with any of the modules only
DINO has (``DINO_MODULES``), so that a file lacking one of them is still read as DINO and the
missing keys are named.

Sizes, from the tensors: hidden width and levels (``transformer.level_embed`` [L, C]), the
backbone levels (1x1 ``input_proj`` convolutions: three read res3-res5, four res2-res5; 3x3
ones are the extra levels), encoder / decoder layers, feed-forward width, queries
(``transformer.tgt_embed`` [Q, C]), classes (the class heads' rows), the denoising label
book (``label_enc`` rows - 1), shared or per-layer class and box heads (the per-layer
tensors all equal or not), ResNet depth. Heads x points as for Deformable DETR (heads from
the training arguments, else the reference's 8). What no tensor holds (dilation, dropout,
loss weights, matcher costs, the top-k of post-processing, the denoising queries' number and
noise, the position encoding's temperature) comes from the "args" a training-script
checkpoint stores, else configs/Base-DINO.yaml's values (the reference's 4-scale recipe).

Class heads (sigmoid, one output per class): a 91-output COCO head (category ids 0..90,
unused ids included) becomes detectron2's 80 contiguous COCO classes: every decoder layer's
head and the query selection's ``enc_out_class_embed`` keep the rows
``convert.COCO_CATEGORY_IDS``; ``label_enc`` (indexed by the targets' labels) keeps the same
rows, then its rows from 91 on (the label book beyond the category ids, which the reference
never reads). Query selection ranks the encoder positions by their highest class logit: over
the 80 outputs it picks the reference's positions unless an unused id's output (trained only
as a negative) was a position's highest. ``keep_classes`` keeps the head as it is; other head
sizes are kept. ``drop_class_head`` leaves out every tensor sized by the classes (class heads,
``enc_out_class_embed``, ``label_enc``).
"""
import re

import torch

from detr_d2.checkpoint.convert import COCO_CATEGORY_IDS, ConversionError, rename_resnet_key
from detr_d2.checkpoint.deformable_layout import (ARGUMENT_KEYS, BACKBONE_PREFIX, BOX_HEAD_KEYS, DECODER_LAYER_KEYS,
                                                  ENCODER_LAYER_KEYS, REFERENCE_COCO_HEAD_SIZE, backbone_description,
                                                  backbone_levels, check_alike, count_indexed, heads_and_points,
                                                  heads_assumed_note, level_options, listed, renamed_tensors,
                                                  size_options, training_arguments, weight_and_bias)
from detr_d2.checkpoint.transformers_layout import resnet_spec

__all__ = ["BASE_CONFIG", "config_options", "dino_key_to_detr_d2", "dino_to_detr_d2", "is_dino_layout"]

# The config OUT.yaml inherits (configs/), the reference's 4-scale R50 recipe.
BASE_CONFIG = "Base-DINO.yaml"
# Backbone levels by the number of 1x1 input projections (return_interm_indices 1-3 or 0-3).
BACKBONE_LEVELS = {3: ["res3", "res4", "res5"], 4: ["res2", "res3", "res4", "res5"]}
DINO_MODULES = ("label_enc.", "transformer.tgt_embed.", "transformer.enc_out_class_embed.",
                "transformer.enc_out_bbox_embed.", "transformer.decoder.ref_point_head.")
CLASS_SIZED_PREFIXES = ("class_embed.", "transformer.enc_out_class_embed.", "label_enc.")
SINGLE_KEYS = ["transformer.level_embed", "transformer.tgt_embed.weight", "label_enc.weight",
               *weight_and_bias("transformer.enc_output", "transformer.enc_output_norm",
                                "transformer.enc_out_class_embed",
                                *(f"transformer.enc_out_bbox_embed.{k}" for k in ("layers.0", "layers.1", "layers.2")),
                                "transformer.decoder.norm", "transformer.decoder.ref_point_head.layers.0",
                                "transformer.decoder.ref_point_head.layers.1")]
CLASS_HEAD_KEYS = ("weight", "bias")
_INDEX = r"\d+"
_KEY_PATTERN = re.compile("^(?:" + "|".join([
    *(rf"transformer\.encoder\.layers\.{_INDEX}\.{re.escape(k)}" for k in ENCODER_LAYER_KEYS),
    *(rf"transformer\.decoder\.layers\.{_INDEX}\.{re.escape(k)}" for k in DECODER_LAYER_KEYS),
    *(re.escape(k) for k in SINGLE_KEYS),
    rf"class_embed\.{_INDEX}\.(?:weight|bias)",
    *(rf"bbox_embed\.{_INDEX}\.{re.escape(k)}" for k in BOX_HEAD_KEYS),
    rf"input_proj\.{_INDEX}\.[01]\.(?:weight|bias)",
]) + ")$")
_ALIAS_PATTERN = re.compile(rf"^transformer\.decoder\.((?:class_embed\.{_INDEX}\.(?:weight|bias))|"
                            rf"(?:bbox_embed\.{_INDEX}\.layers\.[012]\.(?:weight|bias)))$")
# Training arguments of reference variants that compute differently with the same tensors:
# (argument, the value of the model detr_d2 builds).
BUILT_VARIANT = (("two_stage_type", "standard"), ("decoder_sa_type", "sa"), ("transformer_activation", "relu"),
                 ("embed_init_tgt", True), ("decoder_module_seq", ["sa", "ca", "ffn"]), ("dec_layer_number", None),
                 ("use_detached_boxes_dec_out", False), ("use_deformable_box_attn", False), ("pre_norm", False))
# (config key, reference training argument) of what no tensor holds, beyond Deformable DETR's.
DINO_ARGUMENT_KEYS = (("MODEL.MULTI_SCALE.TOPK_DETECTIONS", "num_select"),
                      ("MODEL.DINO.DN_LABEL_NOISE_RATIO", "dn_label_noise_ratio"),
                      ("MODEL.DINO.DN_BOX_NOISE_SCALE", "dn_box_noise_scale"))


def is_dino_layout(state_dict):
    """Whether ``state_dict`` has a torchvision backbone and any module only DINO has."""
    return (any(key.startswith(DINO_MODULES) for key in state_dict)
            and any(key.startswith(BACKBONE_PREFIX) for key in state_dict))


def dino_key_to_detr_d2(key):
    """Reference DINO key -> detr_d2 key; "" for a key left out (batch-norm counters, the
    decoder's head aliases); None for a key the reference model has not."""
    if key.startswith(BACKBONE_PREFIX):
        if key.endswith("num_batches_tracked"):
            return ""
        renamed = rename_resnet_key(key[len(BACKBONE_PREFIX):])
        return None if renamed is None else "backbone.body." + renamed
    if _ALIAS_PATTERN.match(key):
        return ""
    return key if _KEY_PATTERN.match(key) else None


# ---------------------------------------------------------------- structure
def _sizes(state_dict):
    """(levels, encoder layers, decoder layers) the checkpoint's keys make up."""
    levels = (state_dict["transformer.level_embed"].shape[0] if "transformer.level_embed" in state_dict
              else count_indexed(state_dict, "input_proj."))
    return (levels, count_indexed(state_dict, "transformer.encoder.layers."),
            count_indexed(state_dict, "transformer.decoder.layers."))


def _expected_keys(state_dict):
    """Every non-backbone key of the reference model with this checkpoint's layer and level
    counts (the decoder's head aliases aside)."""
    levels, encoder_layers, decoder_layers = _sizes(state_dict)
    keys = list(SINGLE_KEYS)
    keys += [f"transformer.encoder.layers.{i}.{k}" for i in range(encoder_layers) for k in ENCODER_LAYER_KEYS]
    keys += [f"transformer.decoder.layers.{i}.{k}" for i in range(decoder_layers) for k in DECODER_LAYER_KEYS]
    keys += [f"input_proj.{i}.{k}" for i in range(levels) for k in weight_and_bias("0", "1")]
    keys += [f"class_embed.{i}.{k}" for i in range(decoder_layers) for k in CLASS_HEAD_KEYS]
    keys += [f"bbox_embed.{i}.{k}" for i in range(decoder_layers) for k in BOX_HEAD_KEYS]
    return keys


def check_structure(state_dict, source):
    """ConversionError naming ``source`` and the keys if ``state_dict`` has keys the reference
    DINO has not, lacks some it has (a truncated file), per-layer tensors of differing shapes,
    head aliases that differ from the heads, or sizes the config cannot express."""
    unknown = [key for key in state_dict if dino_key_to_detr_d2(key) is None]
    if unknown:
        raise ConversionError(f"{source}: keys the reference DINO (the variant detr_d2 builds) does not have: "
                              f"{listed(unknown)}")
    for stack in ("encoder", "decoder"):
        if not count_indexed(state_dict, f"transformer.{stack}.layers."):
            raise ConversionError(f"{source}: a DINO checkpoint without transformer.{stack}.layers.*: the file is "
                                  "truncated or not a reference DINO checkpoint")
    expected = _expected_keys(state_dict)
    missing = [key for key in expected if key not in state_dict]
    if missing:
        raise ConversionError(f"{source}: a DINO checkpoint without {listed(missing)}: the file is truncated or "
                              "not a reference DINO checkpoint")
    present = {key for key in state_dict if dino_key_to_detr_d2(key) == key}
    extra = present - set(expected)
    if extra:
        levels, _, decoder_layers = _sizes(state_dict)
        raise ConversionError(f"{source}: keys beyond the {levels} levels (transformer.level_embed) and "
                              f"{decoder_layers} decoder layers the checkpoint's other keys make up: {listed(extra)}")
    for pattern in (r"transformer\.encoder\.layers\.\d+\.", r"transformer\.decoder\.layers\.\d+\.",
                    r"class_embed\.\d+\.", r"bbox_embed\.\d+\."):
        check_alike(state_dict, pattern, source)
    _check_aliases(state_dict, source)
    _check_sizes(state_dict, source)


def _check_aliases(state_dict, source):
    """The decoder's head aliases hold the tensors of the heads they name."""
    for key in state_dict:
        match = _ALIAS_PATTERN.match(key)
        if match and not (match[1] in state_dict and torch.equal(state_dict[key], state_dict[match[1]])):
            raise ConversionError(f"{source}: {key} differs from {match[1]} (the reference's decoder holds the "
                                  "model's own heads): the file is not a consistent reference DINO checkpoint")


def _check_sizes(state_dict, source):
    """One feed-forward width for encoder and decoder; a label book of every class."""
    encoder_ffn = state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0]
    decoder_ffn = state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0]
    if encoder_ffn != decoder_ffn:
        raise ConversionError(f"{source}: encoder feed-forward width {encoder_ffn} (transformer.encoder.layers.0."
                              f"linear1.weight) differs from the decoder's {decoder_ffn}: detr_d2 builds one width "
                              "(MODEL.DETR.DIM_FEEDFORWARD)")
    rows, classes = state_dict["label_enc.weight"].shape[0], state_dict["class_embed.0.weight"].shape[0]
    if rows <= classes:
        raise ConversionError(f"{source}: label_enc.weight has {rows} rows for {classes} classes "
                              "(class_embed.0.weight): the denoising label book must hold every class and one more row")


def shared_heads(state_dict, prefix):
    """Whether every decoder layer's ``prefix`` head ("class_embed." / "bbox_embed.") holds
    the tensors of layer 0's (the reference's dec_pred_*_embed_share)."""
    first = [key for key in state_dict if key.startswith(f"{prefix}0.")]
    layers = count_indexed(state_dict, prefix)
    return all(torch.equal(state_dict[key], state_dict[f"{prefix}{i}." + key[len(f"{prefix}0."):]])
               for key in first for i in range(1, layers))


# ---------------------------------------------------------------- conversion
def _class_head_note(converted, state_dict, drop_class_head, keep_classes):
    """Remap, keep or drop the class-sized tensors of ``converted`` in place (see the
    module docstring); the note saying which."""
    rows = state_dict["class_embed.0.weight"].shape[0]
    labelbook = state_dict["label_enc.weight"].shape[0] - 1
    class_sized = [key for key in converted if key.startswith(CLASS_SIZED_PREFIXES)]
    if drop_class_head:
        for key in class_sized:
            del converted[key]
        return (f"class heads ({rows} outputs), the query selection's class head and the denoising label "
                "embeddings dropped for fine-tuning on other classes")
    if rows != REFERENCE_COCO_HEAD_SIZE or keep_classes:
        return f"class heads kept: {rows} classes (sigmoid, no no-object output), denoising label book {labelbook}"
    for key in class_sized:
        beyond_ids = range(rows, labelbook + 1) if key.startswith("label_enc.") else []
        converted[key] = state_dict[key][[*COCO_CATEGORY_IDS, *beyond_ids]].clone()
    return ("COCO class heads remapped: 91 outputs -> 80 detectron2 classes (decoder heads, the query selection's "
            f"head; denoising label embeddings of the same ids: label book {labelbook} -> "
            f"{labelbook - rows + len(COCO_CATEGORY_IDS)})")


def dino_to_detr_d2(state_dict, source, drop_class_head=False, keep_classes=False):
    """Reference DINO state dict -> (detr_d2 state dict, notes).

    ``keep_classes``: leave a 91-output COCO head as it is (else 80 classes, see the module
    docstring); ``drop_class_head``: leave the class-sized tensors out. ConversionError
    (naming ``source`` and the keys) for keys the reference has not, missing keys, layers of
    differing shapes, a backbone that is no ResNet.
    """
    check_structure(state_dict, source)
    converted = renamed_tensors(state_dict, dino_key_to_detr_d2)
    description = backbone_description(state_dict, converted, source, BACKBONE_LEVELS)
    sharing = ", ".join(f"{'shared' if shared_heads(state_dict, prefix) else 'per-layer'} {name} heads"
                        for prefix, name in (("class_embed.", "class"), ("bbox_embed.", "box")))
    notes = [f"DINO, {description}, {sharing}",
             _class_head_note(converted, state_dict, drop_class_head, keep_classes)]
    return converted, notes


# ---------------------------------------------------------------- config
def _check_variant(arguments, source):
    """ConversionError for training arguments of a reference variant detr_d2 does not build."""
    for name, built in BUILT_VARIANT:
        if name in arguments and arguments[name] != built:
            raise ConversionError(f"{source}: its training arguments say {name} = {arguments[name]!r}; detr_d2's "
                                  f"Dino computes {name} = {built!r} only")


def _head_sharing(state_dict, prefix, argument, arguments, source):
    """Shared heads per the training arguments, else per the tensors (equal: shared)."""
    equal = shared_heads(state_dict, prefix)
    shared = arguments.get(argument, equal)
    if shared and not equal:
        raise ConversionError(f"{source}: its training arguments say {argument} = True, but {prefix}* differ "
                              "between decoder layers")
    return bool(shared)


def _temperature(arguments, source):
    """The position encoding's temperature of the training arguments, or None."""
    height, width = arguments.get("pe_temperatureH"), arguments.get("pe_temperatureW")
    if height != width:
        raise ConversionError(f"{source}: its training arguments say pe_temperatureH = {height} and "
                              f"pe_temperatureW = {width}; detr_d2 has one temperature "
                              "(MODEL.MULTI_SCALE.POSITION_TEMPERATURE)")
    return height


def _argument_options(arguments, source):
    """[(config key, value)] of the training arguments no tensor holds."""
    options = [(key, arguments[name]) for key, name in ARGUMENT_KEYS + DINO_ARGUMENT_KEYS if name in arguments]
    if "dn_number" in arguments:
        options.append(("MODEL.DINO.DN_NUMBER", arguments["dn_number"] if arguments.get("use_dn", True) else 0))
    temperature = _temperature(arguments, source)
    if temperature is not None:
        options.append(("MODEL.MULTI_SCALE.POSITION_TEMPERATURE", temperature))
    return options


def config_options(state_dict, converted, source, training_args=None):
    """([(config key, value)] that build, on configs/``BASE_CONFIG``, the ``Dino`` of the
    reference ``state_dict`` converted to ``converted`` (its class-sized tensors as
    converted), and notes saying what was assumed). ``training_args``: the "args" a
    training-script checkpoint stores."""
    arguments = training_arguments(training_args)
    _check_variant(arguments, source)
    in_features, extra_levels = backbone_levels(state_dict, source, BACKBONE_LEVELS)
    levels = len(in_features) + extra_levels
    heads, encoder_points, decoder_points, heads_assumed = heads_and_points(state_dict, levels, arguments, source)
    spec = resnet_spec(converted)
    notes = []
    if heads_assumed:
        notes.append(heads_assumed_note(heads))
    if not arguments:
        notes.append("no training arguments in the file: dilation none, and dropout, loss weights, top-k "
                     "detections (num_select) and denoising (dn_number, noise) as configs/Base-DINO.yaml has them "
                     "(the reference's 4-scale recipe); set MODEL.RESNETS.RES5_DILATION, "
                     "MODEL.MULTI_SCALE.TOPK_DETECTIONS, MODEL.DINO.DN_NUMBER ... (--opts) if it was trained otherwise")
    options = [("MODEL.META_ARCHITECTURE", "Dino"),
               *size_options(state_dict, converted, spec, arguments, heads,
                             state_dict["transformer.tgt_embed.weight"].shape[0]),
               *level_options(in_features, levels, encoder_points, decoder_points)]
    if "label_enc.weight" in converted:
        options.append(("MODEL.DINO.DN_LABELBOOK_SIZE", converted["label_enc.weight"].shape[0] - 1))
    options += [
        ("MODEL.DINO.SHARE_CLASS_HEADS",
         _head_sharing(state_dict, "class_embed.", "dec_pred_class_embed_share", arguments, source)),
        ("MODEL.DINO.SHARE_BOX_HEADS",
         _head_sharing(state_dict, "bbox_embed.", "dec_pred_bbox_embed_share", arguments, source)),
    ]
    return options + _argument_options(arguments, source), notes
