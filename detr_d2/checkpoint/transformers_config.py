"""A transformers DETR ``config.json`` <-> detr_d2 config keys (plain json, no transformers).

Reading (``detr_d2_options``): sizes come from the converted weights (hidden size, layers,
feed-forward width, queries, classes, the detectron2 ResNet: depth, stem/res2 widths,
bottleneck width), what weights do not hold from ``config.json`` (heads, dilation, dropout,
loss weights and matcher costs, where the stride of a bottleneck sits) and
``preprocessor_config.json`` (pixel mean/std, test sizes). Configs detectron2's ResNet or
the reference cannot mean (another activation, a downsampling first stage, encoder and
decoder of different widths or heads) are a ConversionError.

Writing (``transformers_config``): the ``config.json`` of the legacy form that both
transformers 4 and 5 read (``use_timm_backbone`` + ``backbone`` for a timm ResNet, or a
``backbone_config`` of model_type "resnet"), with ``auxiliary_loss`` False (see
``transformers_layout``) and ``use_pretrained_backbone`` False (nothing to download).
"""
from detr_d2.checkpoint.convert import ConversionError
from detr_d2.checkpoint.transformers_layout import TIMM, resnet_spec

__all__ = ["detr_d2_options", "preprocessor_config", "transformers_config"]

TIMM_RESNETS = {18, 34, 50, 101, 152}
_LOSS_KEYS = (("NO_OBJECT_WEIGHT", "eos_coefficient"), ("COST_CLASS", "class_cost"), ("COST_BBOX", "bbox_cost"),
              ("COST_GIOU", "giou_cost"), ("L1_WEIGHT", "bbox_loss_coefficient"),
              ("GIOU_WEIGHT", "giou_loss_coefficient"), ("MASK_WEIGHT", "mask_loss_coefficient"),
              ("DICE_WEIGHT", "dice_loss_coefficient"), ("DROPOUT", "dropout"))


def _layer_count(state_dict, stack):
    return len({key.split(".")[3] for key in state_dict if key.startswith(f"transformer.{stack}.layers.")})


def _backbone(hf_config):
    """(kind "timm"/"resnet", backbone config dict, dilation) of a transformers DETR config."""
    sub = hf_config.get("backbone_config") or {}
    if sub.get("model_type") == "resnet":
        return "resnet", sub, bool(hf_config.get("dilation"))
    if hf_config.get("use_timm_backbone", True) is False and not sub:
        return "resnet", {}, bool(hf_config.get("dilation"))
    if sub and sub.get("model_type") not in (None, "timm_backbone"):
        raise ConversionError(f"backbone model_type {sub.get('model_type')!r}: detr_d2 reads ResNet backbones "
                              "(timm ResNets or transformers' ResNetBackbone)")
    dilation = bool(hf_config.get("dilation")) or sub.get("output_stride") == 16
    return "timm", sub, dilation


def _check(hf_config, kind, sub):
    problems = []
    if hf_config.get("activation_function", "relu") != "relu":
        problems.append(f"activation_function {hf_config['activation_function']!r} (DETR uses relu)")
    for ours, (a, b) in (("feed-forward width", ("encoder_ffn_dim", "decoder_ffn_dim")),
                         ("head count", ("encoder_attention_heads", "decoder_attention_heads"))):
        if hf_config.get(a, 0) != hf_config.get(b, 0):
            problems.append(f"{a} {hf_config.get(a)} != {b} {hf_config.get(b)} (one {ours} in detr_d2)")
    if kind == "resnet" and sub.get("downsample_in_first_stage"):
        problems.append("a ResNet whose first stage downsamples (detectron2's res2 has stride 1)")
    if kind == "resnet" and sub.get("hidden_act", "relu") != "relu":
        problems.append(f"a ResNet with hidden_act {sub['hidden_act']!r}")
    if problems:
        raise ConversionError("the transformers config has what detr_d2 cannot build: " + "; ".join(problems))


def detr_d2_options(state_dict, segmentation, hf_config=None, preprocessor=None):
    """[(config key, value)] that build, on configs/Base-DETR.yaml, the model of the
    converted ``state_dict``; and notes (what was assumed without ``config.json``)."""
    hf_config = hf_config or {}
    notes = []
    kind, sub, dilation = _backbone(hf_config) if hf_config else ("timm", {}, False)
    _check(hf_config, kind, sub)
    spec = resnet_spec(state_dict)
    detr = {
        "HIDDEN_DIM": state_dict["query_embed.weight"].shape[1],
        "NUM_OBJECT_QUERIES": state_dict["query_embed.weight"].shape[0],
        "ENC_LAYERS": _layer_count(state_dict, "encoder"),
        "DEC_LAYERS": _layer_count(state_dict, "decoder"),
        "DIM_FEEDFORWARD": state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        "NHEADS": hf_config.get("encoder_attention_heads", 8),
        "PRE_NORM": False,
        "POSITION_EMBEDDING": "learned" if "position_embedding.row_embed.weight" in state_dict else "sine",
    }
    if "class_embed.weight" in state_dict:
        detr["NUM_CLASSES"] = state_dict["class_embed.weight"].shape[0] - 1
    if not hf_config:
        notes.append("no config.json: 8 attention heads and no dilation assumed (set MODEL.DETR.NHEADS / "
                     "MODEL.RESNETS.RES5_DILATION in the written config if the model differs)")
    detr.update((ours, hf_config[theirs]) for ours, theirs in _LOSS_KEYS if theirs in hf_config)
    resnets = {
        "DEPTH": spec["depth"],
        "STEM_OUT_CHANNELS": spec["stem_out_channels"],
        "RES2_OUT_CHANNELS": spec["res2_out_channels"],
        "WIDTH_PER_GROUP": spec["width_per_group"],
        "NUM_GROUPS": 1,
        "STRIDE_IN_1X1": kind == "resnet" and bool(sub.get("downsample_in_bottleneck")),
        "RES5_DILATION": 2 if dilation else 1,
        "OUT_FEATURES": ["res2", "res3", "res4", "res5"] if segmentation else ["res5"],
    }
    options = [(f"MODEL.DETR.{key}", value) for key, value in detr.items()]
    options += [(f"MODEL.RESNETS.{key}", value) for key, value in resnets.items()]
    options.append(("MODEL.MASK_ON", segmentation))
    options += _preprocessing_options(preprocessor or {})
    return options, notes


def _preprocessing_options(preprocessor):
    options = []
    if preprocessor.get("do_normalize", True) and "image_mean" in preprocessor:
        scale = 255.0 if preprocessor.get("do_rescale", True) else 1.0
        options.append(("MODEL.PIXEL_MEAN", [round(v * scale, 4) for v in preprocessor["image_mean"]]))
        options.append(("MODEL.PIXEL_STD", [round(v * scale, 4) for v in preprocessor["image_std"]]))
    size = preprocessor.get("size") or {}
    if "shortest_edge" in size:
        options.append(("INPUT.MIN_SIZE_TEST", size["shortest_edge"]))
    if "longest_edge" in size:
        options.append(("INPUT.MAX_SIZE_TEST", size["longest_edge"]))
    return options


# ---------------------------------------------------------------- detr_d2 -> transformers
def backbone_format(cfg, spec):
    """"timm" when the ResNet is a standard timm resnet{18,34,50,101,152}, else "transformers"."""
    resnets = cfg.MODEL.RESNETS
    standard = (spec["depth"] in TIMM_RESNETS and spec["stem_out_channels"] == 64 and resnets.NUM_GROUPS == 1
                and spec["res2_out_channels"] == (256 if spec["bottleneck"] else 64)
                and spec["width_per_group"] == 64 and not resnets.STRIDE_IN_1X1)
    return TIMM if standard else "transformers"


def _check_exportable(cfg, spec, flavour):
    detr = cfg.MODEL.DETR
    problems = []
    if cfg.MODEL.BACKBONE.NAME != "build_resnet_backbone" or detr.IN_FEATURE != "res5":
        problems.append("a detectron2 ResNet feeding res5 to the transformer (MODEL.BACKBONE.NAME "
                        f"{cfg.MODEL.BACKBONE.NAME}, MODEL.DETR.IN_FEATURE {detr.IN_FEATURE})")
    if detr.PRE_NORM:
        problems.append("post-norm layers (MODEL.DETR.PRE_NORM True: transformers' DETR has no pre-norm form)")
    if flavour == TIMM and not backbone_format(cfg, spec) == TIMM:
        problems.append("a standard ResNet for --backbone-format timm (use --backbone-format transformers)")
    if flavour != TIMM and cfg.MODEL.RESNETS.RES5_DILATION != 1:
        problems.append("no dilation with transformers' ResNetBackbone (DC5 models: --backbone-format timm)")
    if flavour != TIMM and spec["bottleneck"] and spec["res2_out_channels"] != 4 * spec["width_per_group"]:
        problems.append("bottleneck blocks 4x narrower than their output (transformers' ResNet reduction)")
    if problems:
        raise ConversionError("transformers' DETR cannot hold this model: it needs " + "; ".join(problems))


def _json_number(value, integral_as_int):
    return int(value) if integral_as_int and float(value).is_integer() else float(value)


def transformers_config(cfg, state_dict, class_names, flavour):
    """The ``config.json`` dict of the transformers DETR computing what ``cfg``'s model with
    the detr_d2 weights ``state_dict`` computes."""
    spec = resnet_spec(state_dict)
    _check_exportable(cfg, spec, flavour)
    detr = cfg.MODEL.DETR
    segmentation = bool(cfg.MODEL.MASK_ON)
    config = {
        "model_type": "detr",
        "architectures": ["DetrForSegmentation" if segmentation else "DetrForObjectDetection"],
        "d_model": detr.HIDDEN_DIM, "encoder_layers": detr.ENC_LAYERS, "decoder_layers": detr.DEC_LAYERS,
        "encoder_attention_heads": detr.NHEADS, "decoder_attention_heads": detr.NHEADS,
        "encoder_ffn_dim": detr.DIM_FEEDFORWARD, "decoder_ffn_dim": detr.DIM_FEEDFORWARD,
        "num_queries": detr.NUM_OBJECT_QUERIES, "position_embedding_type": detr.POSITION_EMBEDDING,
        "activation_function": "relu", "dropout": detr.DROPOUT, "attention_dropout": detr.DROPOUT,
        "activation_dropout": detr.DROPOUT, "auxiliary_loss": False, "num_channels": 3,
        "dilation": cfg.MODEL.RESNETS.RES5_DILATION == 2, "use_pretrained_backbone": False,
        "id2label": {str(i): name for i, name in enumerate(class_names)},
        "label2id": {name: i for i, name in enumerate(class_names)},
    }
    # transformers 5 types the costs and loss coefficients as int (eos_coefficient float)
    config.update((theirs, _json_number(getattr(detr, ours), theirs != "eos_coefficient"))
                  for ours, theirs in _LOSS_KEYS if ours != "DROPOUT")
    if flavour == TIMM:
        config.update(use_timm_backbone=True, backbone=f"resnet{spec['depth']}", backbone_config=None)
    else:
        config.update(use_timm_backbone=False, backbone=None, backbone_config={
            "model_type": "resnet", "num_channels": 3, "embedding_size": spec["stem_out_channels"],
            "hidden_sizes": spec["stage_channels"], "depths": spec["blocks_per_stage"],
            "layer_type": "bottleneck" if spec["bottleneck"] else "basic", "hidden_act": "relu",
            "downsample_in_first_stage": False, "downsample_in_bottleneck": bool(cfg.MODEL.RESNETS.STRIDE_IN_1X1),
            "out_features": ["stage1", "stage2", "stage3", "stage4"]})
    return config


def preprocessor_config(cfg):
    """A ``DetrImageProcessor`` config with the model's pixel statistics and test sizes."""
    if cfg.INPUT.FORMAT != "RGB":
        raise ConversionError(f"INPUT.FORMAT {cfg.INPUT.FORMAT}: transformers' image processor gives RGB pixels")
    return {
        "image_processor_type": "DetrImageProcessor", "format": "coco_detection", "do_resize": True,
        "size": {"shortest_edge": cfg.INPUT.MIN_SIZE_TEST, "longest_edge": cfg.INPUT.MAX_SIZE_TEST},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [v / 255 for v in cfg.MODEL.PIXEL_MEAN], "image_std": [v / 255 for v in cfg.MODEL.PIXEL_STD],
        "do_pad": True,
    }
