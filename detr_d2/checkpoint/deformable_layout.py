"""Checkpoints of the reference Deformable DETR (fundamentalvision/Deformable-DETR): their
tensors under detr_d2's names, and the config of the model they hold.

Names: ``backbone.0.body.*`` (torchvision ResNet) -> ``backbone.body.*`` (detectron2 ResNet,
``convert.rename_resnet_key``), ``num_batches_tracked`` left out; the reference's aliases of
the heads inside its decoder (``transformer.decoder.class_embed.*`` /
``transformer.decoder.bbox_embed.*``, the same tensors as ``class_embed.*`` / ``bbox_embed.*``)
left out; every other key (``transformer.*``, ``class_embed.N``, ``bbox_embed.N``,
``query_embed``, ``input_proj.N``) keeps its name.

Flavour, from the keys: two-stage = ``transformer.enc_output.*`` present; iterative box
refinement = ``transformer.decoder.bbox_embed.*`` present (the reference puts the heads into
its decoder only to refine boxes). Without refinement the per-layer heads are one module, so
their tensors must be equal.

Sizes, from the tensors: hidden width and levels (``transformer.level_embed`` [L, C]), the
backbone levels (1x1 ``input_proj`` convolutions: one level is res5 alone, three are
res3-res5; 3x3 ones are the extra levels), encoder / decoder layers, feed-forward width,
queries (``query_embed`` [Q, 2C]), classes, ResNet depth. The deformable attention's
``sampling_offsets`` [H*L*P*2, C] and ``attention_weights`` [H*L*P, C] fix only heads x
points (H*P): the heads H come from the training arguments a training-script checkpoint
stores ("args"), else the reference's 8 are assumed; so does a two-stage model's query count
(no tensor holds it; 300 assumed), dilation (DC5) and dropout.

Class heads (sigmoid, one output per class, no no-object output): a 91-output COCO head
(category ids 0..90, unused ids included) becomes detectron2's 80 contiguous COCO classes:
each decoder layer's head keeps the rows ``convert.COCO_CATEGORY_IDS``. The two-stage
model's last head (``class_embed.{DEC_LAYERS}``) scores the encoder's proposals: the
reference trains it class-agnostically (every target labelled 0) and picks the proposals by
its column 0, so its row 0 is the one that matters and must stay column 0; its other
columns are rows the reference always trains as negatives. It keeps rows
``[0] + COCO_CATEGORY_IDS[1:]`` (80 rows): the same proposals as the reference, and
detr_d2's class-agnostic proposal loss (label 0) reads the same column. A two-stage model
without refinement shares one class head between the decoder and the proposals, which no
single choice of rows serves: it converts only with its head kept (``keep_classes``). Other
head sizes are kept as they are.
"""
import math
import re

import torch

from detr_d2.checkpoint.convert import COCO_CATEGORY_IDS, ConversionError, rename_resnet_key
from detr_d2.checkpoint.transformers_layout import resnet_spec

__all__ = ["BASE_CONFIG", "config_options", "deformable_key_to_detr_d2", "deformable_to_detr_d2",
           "is_deformable_layout"]

# The config OUT.yaml inherits (configs/), the reference's R50 recipe.
BASE_CONFIG = "Base-DeformableDETR.yaml"
REFERENCE_COCO_HEAD_SIZE = 91
PROPOSAL_HEAD_COCO_ROWS = (0,) + COCO_CATEGORY_IDS[1:]
REFERENCE_HEADS = 8
REFERENCE_TWO_STAGE_QUERIES = 300
BACKBONE_PREFIX = "backbone.0.body."
HEAD_ALIAS_PREFIXES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")
# Backbone levels fed to the neck by the number of 1x1 input projections: the reference reads
# res5 alone for one level, else res3-res5 (strides 8/16/32).
BACKBONE_LEVELS = {1: ["res5"], 3: ["res3", "res4", "res5"]}
STAGES = ("res2", "res3", "res4", "res5")

_ATTENTION = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")


def weight_and_bias(*modules):
    return [f"{module}.{kind}" for module in modules for kind in ("weight", "bias")]


ENCODER_LAYER_KEYS = weight_and_bias(*(f"self_attn.{p}" for p in _ATTENTION), "norm1", "linear1", "linear2", "norm2")
DECODER_LAYER_KEYS = (weight_and_bias(*(f"cross_attn.{p}" for p in _ATTENTION), "norm1")
                      + ["self_attn.in_proj_weight", "self_attn.in_proj_bias"]
                      + weight_and_bias("self_attn.out_proj", "norm2", "linear1", "linear2", "norm3"))
BOX_HEAD_KEYS = weight_and_bias("layers.0", "layers.1", "layers.2")
TWO_STAGE_KEYS = weight_and_bias(*(f"transformer.{m}" for m in ("enc_output", "enc_output_norm", "pos_trans",
                                                                   "pos_trans_norm")))
LEARNED_QUERY_KEYS = ["query_embed.weight", *weight_and_bias("transformer.reference_points")]
_INDEX = r"\d+"
_KEY_PATTERN = re.compile("^(?:" + "|".join([
    r"transformer\.level_embed",
    *(rf"transformer\.encoder\.layers\.{_INDEX}\.{re.escape(k)}" for k in ENCODER_LAYER_KEYS),
    *(rf"transformer\.decoder\.layers\.{_INDEX}\.{re.escape(k)}" for k in DECODER_LAYER_KEYS),
    *(re.escape(k) for k in TWO_STAGE_KEYS + LEARNED_QUERY_KEYS),
    rf"class_embed\.{_INDEX}\.(?:weight|bias)",
    *(rf"bbox_embed\.{_INDEX}\.{re.escape(k)}" for k in BOX_HEAD_KEYS),
    rf"input_proj\.{_INDEX}\.[01]\.(?:weight|bias)",
]) + ")$")


def is_deformable_layout(state_dict):
    """Whether ``state_dict`` has the keys only the reference Deformable DETR has: a
    torchvision backbone and ``transformer.level_embed``."""
    return "transformer.level_embed" in state_dict and any(key.startswith(BACKBONE_PREFIX) for key in state_dict)


def deformable_key_to_detr_d2(key):
    """Reference Deformable DETR key -> detr_d2 key; "" for a key left out (batch-norm
    counters, the decoder's head aliases); None for a key the reference model has not."""
    if key.startswith(BACKBONE_PREFIX):
        if key.endswith("num_batches_tracked"):
            return ""
        renamed = rename_resnet_key(key[len(BACKBONE_PREFIX):])
        return None if renamed is None else "backbone.body." + renamed
    if key.startswith(HEAD_ALIAS_PREFIXES):
        return "" if re.match(rf"transformer\.decoder\.(?:class_embed\.{_INDEX}\.(?:weight|bias)|bbox_embed\."
                              rf"{_INDEX}\.layers\.[012]\.(?:weight|bias))$", key) else None
    return key if _KEY_PATTERN.match(key) else None


# ---------------------------------------------------------------- structure
def count_indexed(state_dict, prefix):
    """1 + the largest N of the keys ``<prefix>N.*`` (0 if none)."""
    found = [int(m[1]) for key in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))]
    return max(found) + 1 if found else 0


def _flavour(state_dict):
    """(two_stage, with_box_refine) from the keys present."""
    two_stage = "transformer.enc_output.weight" in state_dict
    refine = any(key.startswith("transformer.decoder.bbox_embed.") for key in state_dict)
    return two_stage, refine


def _expected_keys(state_dict):
    """Every non-backbone key of the reference model with this checkpoint's layer, level
    and head counts and flavour."""
    two_stage, _ = _flavour(state_dict)
    encoder_layers = count_indexed(state_dict, "transformer.encoder.layers.")
    decoder_layers = count_indexed(state_dict, "transformer.decoder.layers.")
    levels = state_dict["transformer.level_embed"].shape[0]
    keys = ["transformer.level_embed"]
    keys += [f"transformer.encoder.layers.{i}.{k}" for i in range(encoder_layers) for k in ENCODER_LAYER_KEYS]
    keys += [f"transformer.decoder.layers.{i}.{k}" for i in range(decoder_layers) for k in DECODER_LAYER_KEYS]
    keys += [f"input_proj.{i}.{k}" for i in range(levels) for k in weight_and_bias("0", "1")]
    heads = decoder_layers + (1 if two_stage else 0)
    keys += [f"class_embed.{i}.{k}" for i in range(heads) for k in ("weight", "bias")]
    keys += [f"bbox_embed.{i}.{k}" for i in range(heads) for k in BOX_HEAD_KEYS]
    keys += TWO_STAGE_KEYS if two_stage else LEARNED_QUERY_KEYS
    return keys


def listed(keys, limit=3):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def check_structure(state_dict, source):
    """ConversionError naming ``source`` and the keys if ``state_dict`` has keys the
    reference model has not, lacks some it has (a truncated file), or per-layer tensors of
    differing shapes."""
    unknown = [key for key in state_dict if deformable_key_to_detr_d2(key) is None]
    if unknown:
        raise ConversionError(f"{source}: keys the reference Deformable DETR does not have: {listed(unknown)}")
    for stack in ("encoder", "decoder"):
        if not count_indexed(state_dict, f"transformer.{stack}.layers."):
            raise ConversionError(f"{source}: a Deformable DETR checkpoint without transformer.{stack}.layers.*: "
                                  "the file is truncated or not a reference Deformable DETR checkpoint")
    expected = _expected_keys(state_dict)
    present = {key for key in state_dict if not key.startswith((BACKBONE_PREFIX, *HEAD_ALIAS_PREFIXES))}
    missing = [key for key in expected if key not in state_dict]
    if missing:
        raise ConversionError(f"{source}: a Deformable DETR checkpoint without {listed(missing)}: the file is "
                              "truncated or not a reference Deformable DETR checkpoint")
    extra = present - set(expected)
    if extra:
        raise ConversionError(f"{source}: keys beyond the layers, levels and heads the checkpoint's other keys "
                              f"make up ({'two-stage' if _flavour(state_dict)[0] else 'learned queries'}, "
                              f"{state_dict['transformer.level_embed'].shape[0]} levels from "
                              f"transformer.level_embed): {listed(extra)}")
    for pattern in (r"transformer\.encoder\.layers\.\d+\.", r"transformer\.decoder\.layers\.\d+\.",
                    r"class_embed\.\d+\.", r"bbox_embed\.\d+\."):
        check_alike(state_dict, pattern, source)


def check_alike(state_dict, pattern, source):
    """Every ``pattern``-numbered copy (layer or head) has the shapes of copy 0."""
    first = {}
    for key in sorted(state_dict):
        match = re.match(pattern, key)
        if not match:
            continue
        suffix = key[match.end():]
        shape = tuple(state_dict[key].shape)
        if first.setdefault(suffix, (key, shape))[1] != shape:
            raise ConversionError(f"{source}: {key} has shape {list(shape)} where {first[suffix][0]} has "
                                  f"{list(first[suffix][1])}: the layers or heads differ in size")


def _check_shared_heads(state_dict, heads, source):
    """Without refinement the reference's per-layer heads are one module: equal tensors."""
    for prefix in ("class_embed.", "bbox_embed."):
        for key in [k for k in state_dict if k.startswith(f"{prefix}0.")]:
            for index in range(1, heads):
                other = f"{prefix}{index}." + key[len(f"{prefix}0."):]
                if not torch.equal(state_dict[key], state_dict[other]):
                    raise ConversionError(
                        f"{source}: {other} differs from {key}, but the checkpoint has no "
                        "transformer.decoder.bbox_embed.* (the reference's keys of iterative box refinement, "
                        "where each layer has its own heads): the file is not a consistent reference checkpoint")


# ---------------------------------------------------------------- conversion
def _head_count(state_dict):
    return count_indexed(state_dict, "class_embed.")


def _class_head_note(converted, state_dict, source, drop_class_head, keep_classes):
    """Remap, keep or drop the class heads of ``converted`` in place (see the module
    docstring); the note saying which."""
    heads = _head_count(state_dict)
    rows = state_dict["class_embed.0.weight"].shape[0]
    head_keys = [f"class_embed.{i}.{kind}" for i in range(heads) for kind in ("weight", "bias")]
    if drop_class_head:
        for key in head_keys:
            del converted[key]
        return f"class heads ({rows} outputs) dropped for fine-tuning on other classes"
    if rows != REFERENCE_COCO_HEAD_SIZE or keep_classes:
        return f"class heads kept: {rows} classes (sigmoid, no no-object output)"
    two_stage, refine = _flavour(state_dict)
    if two_stage and not refine:
        raise ConversionError(
            f"{source}: a two-stage model without box refinement shares one class head between its decoder and "
            "its proposals, whose 91 COCO outputs cannot serve both as 80 classes (the proposals are picked by "
            "output 0): convert it with --keep-classes (91 classes kept)")
    decoder_layers = heads - (1 if two_stage else 0)
    for index in range(heads):
        kept = list(PROPOSAL_HEAD_COCO_ROWS if index == decoder_layers else COCO_CATEGORY_IDS)
        for kind in ("weight", "bias"):
            converted[f"class_embed.{index}.{kind}"] = state_dict[f"class_embed.{index}.{kind}"][kept].clone()
    proposals = (f"; the proposal head class_embed.{decoder_layers} keeps its class-agnostic output 0 first"
                 if two_stage else "")
    return f"COCO class heads remapped: 91 outputs -> 80 detectron2 classes{proposals}"


def deformable_to_detr_d2(state_dict, source, drop_class_head=False, keep_classes=False):
    """Reference Deformable DETR state dict -> (detr_d2 state dict, notes).

    ``keep_classes``: leave a 91-output COCO head as it is (else 80 classes, see the module
    docstring); ``drop_class_head``: leave the class heads out. ConversionError (naming
    ``source`` and the keys) for keys the reference has not, missing keys, layers of
    differing shapes, a backbone that is no ResNet.
    """
    check_structure(state_dict, source)
    two_stage, refine = _flavour(state_dict)
    heads = _head_count(state_dict)
    if not refine:
        _check_shared_heads(state_dict, heads, source)
    converted = renamed_tensors(state_dict, deformable_key_to_detr_d2)
    description = backbone_description(state_dict, converted, source)
    flavour = ", ".join(["two-stage"] * two_stage + ["iterative box refinement"] * refine) or "plain"
    notes = [f"Deformable DETR ({flavour}), {description}",
             _class_head_note(converted, state_dict, source, drop_class_head, keep_classes)]
    return converted, notes


def renamed_tensors(state_dict, rename):
    """{rename(key): tensor} of every key ``rename`` gives a name (not "" or None)."""
    return {renamed: value for key, value in state_dict.items() if (renamed := rename(key))}


def backbone_description(state_dict, converted, source, read_levels=None):
    """"N levels (res3, res4, res5 + 1 extra), ResNet-D backbone" of a reference checkpoint
    and its ``converted`` tensors; ConversionError (naming ``source``) for a backbone that is
    no ResNet or input projections that do not fit it (``read_levels``: see
    ``backbone_levels``)."""
    try:
        spec = resnet_spec(converted)
    except ConversionError as error:
        raise ConversionError(f"{source}: {error} (keys {BACKBONE_PREFIX}*)") from None
    in_features, extra_levels = backbone_levels(state_dict, source, read_levels)
    check_projection_inputs(state_dict, in_features, spec, source)
    return (f"{len(in_features) + extra_levels} levels ({', '.join(in_features)}"
            f"{f' + {extra_levels} extra' if extra_levels else ''}), ResNet-{spec['depth']} backbone")


# ---------------------------------------------------------------- config
def backbone_levels(state_dict, source, read_levels=None):
    """(backbone level names fed to the neck, number of extra levels): the 1x1 input
    projections read backbone levels, the 3x3 ones after them make the extra levels.
    ``read_levels``: {number of 1x1 projections: the levels they read} (default
    ``BACKBONE_LEVELS``, the reference Deformable DETR's)."""
    read_levels = BACKBONE_LEVELS if read_levels is None else read_levels
    levels = state_dict["transformer.level_embed"].shape[0]
    kernels = [state_dict[f"input_proj.{i}.0.weight"].shape[-1] for i in range(levels)]
    from_backbone = kernels.count(1)
    if from_backbone not in read_levels or kernels != [1] * from_backbone + [3] * (levels - from_backbone):
        choices = " or ".join(names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"
                              for names in read_levels.values())
        raise ConversionError(f"{source}: input_proj.*.0.weight kernel sizes {kernels}: the reference projects "
                              f"{choices} with 1x1 convolutions, then makes extra levels with 3x3 ones")
    return read_levels[from_backbone], levels - from_backbone


def check_projection_inputs(state_dict, in_features, spec, source):
    """Each 1x1 input projection reads as many channels as its backbone level has."""
    for index, name in enumerate(in_features):
        key = f"input_proj.{index}.0.weight"
        channels = spec["stage_channels"][STAGES.index(name)]
        if state_dict[key].shape[1] != channels:
            raise ConversionError(f"{source}: {key} reads {state_dict[key].shape[1]} channels, but the "
                                  f"ResNet-{spec['depth']}'s {name} has {channels}")


def training_arguments(args):
    """The reference training script's "args" (argparse.Namespace, or a dict) as a dict."""
    if args is None:
        return {}
    return dict(args) if isinstance(args, dict) else dict(vars(args))


def heads_and_points(state_dict, levels, arguments, source):
    """(heads, encoder points, decoder points, assumed?) from the attention projections
    [H*L*P*2, C] / [H*L*P, C] and the training arguments' heads when present."""
    products = []
    for stack, attention in (("encoder", "self_attn"), ("decoder", "cross_attn")):
        prefix = f"transformer.{stack}.layers.0.{attention}."
        offsets = state_dict[prefix + "sampling_offsets.weight"].shape[0]
        weights = state_dict[prefix + "attention_weights.weight"].shape[0]
        if offsets != 2 * weights or weights % levels:
            raise ConversionError(f"{source}: {prefix}sampling_offsets.weight has {offsets} rows and "
                                  f"attention_weights.weight {weights}: expected heads x {levels} levels x points "
                                  "(x 2 for the offsets)")
        products.append(weights // levels)
    hidden = state_dict["transformer.level_embed"].shape[1]
    heads = arguments.get("nheads")
    assumed = heads is None
    if assumed:
        heads = math.gcd(REFERENCE_HEADS, *products, hidden)
    if any(product % heads for product in products) or hidden % heads:
        raise ConversionError(f"{source}: its training arguments say {heads} heads, which do not divide the "
                              f"attention's heads x points ({products[0]}, {products[1]}) and hidden width {hidden}")
    return heads, products[0] // heads, products[1] // heads, assumed


# (MODEL.DETR / MODEL.MULTI_SCALE key, reference training argument) of what no tensor holds
ARGUMENT_KEYS = (("MODEL.DETR.DROPOUT", "dropout"), ("MODEL.DETR.CLASS_WEIGHT", "cls_loss_coef"),
                  ("MODEL.DETR.L1_WEIGHT", "bbox_loss_coef"), ("MODEL.DETR.GIOU_WEIGHT", "giou_loss_coef"),
                  ("MODEL.DETR.COST_CLASS", "set_cost_class"), ("MODEL.DETR.COST_BBOX", "set_cost_bbox"),
                  ("MODEL.DETR.COST_GIOU", "set_cost_giou"), ("MODEL.MULTI_SCALE.FOCAL_ALPHA", "focal_alpha"))


def config_options(state_dict, converted, source, training_args=None):
    """([(config key, value)] that build, on configs/``BASE_CONFIG``, the model of the
    reference ``state_dict`` converted to ``converted`` (its class heads as converted), and
    notes saying what was assumed). ``training_args``: the "args" a training-script
    checkpoint stores (heads, two-stage queries, dilation, dropout, loss weights)."""
    arguments = training_arguments(training_args)
    two_stage, refine = _flavour(state_dict)
    in_features, extra_levels = backbone_levels(state_dict, source)
    levels = len(in_features) + extra_levels
    heads, encoder_points, decoder_points, heads_assumed = heads_and_points(state_dict, levels, arguments, source)
    spec = resnet_spec(converted)
    notes = []
    if heads_assumed:
        notes.append(heads_assumed_note(heads))
    queries = state_dict["query_embed.weight"].shape[0] if not two_stage else arguments.get("num_queries")
    if queries is None:
        queries = REFERENCE_TWO_STAGE_QUERIES
        notes.append(f"two-stage: the number of proposals is in no tensor; {queries} (the reference's default) "
                     "assumed: set MODEL.DETR.NUM_OBJECT_QUERIES (--opts) if it was trained with other --num_queries")
    if "dilation" not in arguments:
        notes.append("dilation is not stored in weights: none assumed (for a DC5 model set "
                     "MODEL.RESNETS.RES5_DILATION 2)")
    options = [("MODEL.META_ARCHITECTURE", "DeformableDetr"),
               *size_options(state_dict, converted, spec, arguments, heads, queries),
               *level_options(in_features, levels, encoder_points, decoder_points),
               ("MODEL.MULTI_SCALE.WITH_BOX_REFINE", refine),
               ("MODEL.MULTI_SCALE.TWO_STAGE", two_stage)]
    options += [(key, arguments[name]) for key, name in ARGUMENT_KEYS if name in arguments]
    return options, notes


def size_options(state_dict, converted, spec, arguments, heads, queries):
    """OUT.yaml options of a reference multi-scale checkpoint (Deformable DETR, DINO) that its
    tensors fix alike: ResNet sizes and dilation, the transformer's sizes, ``queries``, and
    the classes of a class head that was kept (``converted`` holds it)."""
    options = [
        ("MODEL.RESNETS.DEPTH", spec["depth"]),
        ("MODEL.RESNETS.STEM_OUT_CHANNELS", spec["stem_out_channels"]),
        ("MODEL.RESNETS.RES2_OUT_CHANNELS", spec["res2_out_channels"]),
        ("MODEL.RESNETS.WIDTH_PER_GROUP", spec["width_per_group"]),
        ("MODEL.RESNETS.RES5_DILATION", 2 if arguments.get("dilation") else 1),
        ("MODEL.DETR.HIDDEN_DIM", state_dict["transformer.level_embed"].shape[1]),
        ("MODEL.DETR.NHEADS", heads),
        ("MODEL.DETR.ENC_LAYERS", count_indexed(state_dict, "transformer.encoder.layers.")),
        ("MODEL.DETR.DEC_LAYERS", count_indexed(state_dict, "transformer.decoder.layers.")),
        ("MODEL.DETR.DIM_FEEDFORWARD", state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0]),
        ("MODEL.DETR.NUM_OBJECT_QUERIES", int(queries)),
    ]
    if "class_embed.0.weight" in converted:
        options.append(("MODEL.DETR.NUM_CLASSES", converted["class_embed.0.weight"].shape[0]))
    return options


def level_options(in_features, levels, encoder_points, decoder_points):
    """OUT.yaml options of the feature levels and the sampling points per head and level."""
    return [("MODEL.MULTI_SCALE.IN_FEATURES", in_features),
            ("MODEL.MULTI_SCALE.NUM_FEATURE_LEVELS", levels),
            ("MODEL.MULTI_SCALE.ENC_N_POINTS", encoder_points),
            ("MODEL.MULTI_SCALE.DEC_N_POINTS", decoder_points)]


def heads_assumed_note(heads):
    """The converter's note when no training arguments give the number of attention heads."""
    return (f"{heads} attention heads assumed (the weights fix heads x points only; the reference trains 8): "
            "if the model was trained with other --nheads, set MODEL.DETR.NHEADS and "
            "MODEL.MULTI_SCALE.ENC_N_POINTS / DEC_N_POINTS so that heads x points stay the same")
