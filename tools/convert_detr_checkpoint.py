#!/usr/bin/env python
"""Convert a DETR checkpoint for detr_d2, or a detr_d2 checkpoint to a transformers model folder.

    python tools/convert_detr_checkpoint.py --source detr-r50-e632da11.pth --output detr_r50.pth
    python tools/convert_detr_checkpoint.py --source REF.pth --output OUT.pth --drop-class-head
    python tools/convert_detr_checkpoint.py --source WRAPPER_model_final.pth --output OUT.pth
    python tools/convert_detr_checkpoint.py --source detr-resnet-50/ --output detr_r50_hf.pth
    python tools/convert_detr_checkpoint.py --source r50_deformable_detr-checkpoint.pth --output deformable_r50.pth
    python tools/convert_detr_checkpoint.py --source checkpoint0011_4scale.pth --output dino_r50.pth
    python tools/convert_detr_checkpoint.py --to transformers --source OUT.pth --config-file CFG \\
        --output my-detr/

--source: a checkpoint of the reference DETR (facebookresearch/detr), of its detectron2
wrapper (d2/: its converter's and its trainer's files), of the reference Deformable DETR
(fundamentalvision/Deformable-DETR), of the reference DINO (IDEA-Research/DINO), of
detr_d2, or a Hugging Face transformers DetrForObjectDetection / DetrForSegmentation (a
folder with config.json and model.safetensors or pytorch_model.bin, or the weights file
alone); the layout is detected from the keys. The output loads with ``MODEL.WEIGHTS OUT.pth`` into the model of the
matching config. From a transformers model the tool also writes that config (OUT.yaml,
MODEL.WEIGHTS set) and the class names of its id2label (OUT.metadata.json, read by
tools/demo.py and evaluation when no dataset names the classes); from a Deformable DETR
OUT.yaml inherits configs/Base-DeformableDETR.yaml and sets what the tensors fix (sizes,
levels, refinement, two-stage, classes), from a DINO configs/Base-DINO.yaml (sizes, levels,
queries, classes, denoising label book, shared or per-layer heads); --opts KEY VALUE pairs
are written into OUT.yaml too, for what they do not fix (e.g. MODEL.DETR.NUM_OBJECT_QUERIES
of a two-stage Deformable DETR, MODEL.MULTI_SCALE.TOPK_DETECTIONS of a DINO).
COCO heads of the reference models become detectron2's 80 classes unless --keep-classes.

--to transformers writes config.json, model.safetensors and preprocessor_config.json of the
transformers DETR computing what the --config-file model computes with --source's weights.
Files are written atomically: an interrupted run never leaves a half-written file.
"""
import os
import sys
from pathlib import Path

import yaml

import detr_d2  # noqa: F401  (compat fixes, registers Detr)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from detr_d2 import add_detr_config
from detr_d2.checkpoint import atomic_torch_save, atomic_write
from detr_d2.checkpoint.class_names import read_class_metadata, write_class_metadata
from detr_d2.checkpoint.layouts import TRANSFORMERS, read_layout
from detr_d2.checkpoint.sources import read_source, write_transformers_folder
from detr_d2.checkpoint.transformers_config import (
    backbone_format,
    detr_d2_options,
    preprocessor_config,
    transformers_config,
)
from detr_d2.checkpoint.transformers_layout import detr_d2_to_transformers, resnet_spec
from detr_d2.engine import merge_config
from detr_d2.errors import SetupError
from detr_d2.utils.tool_arguments import ToolArgumentParser, add_config_overrides, add_trust_pickle

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE_CONFIG = CONFIGS / "Base-DETR.yaml"


def build_parser():
    parser = ToolArgumentParser(__doc__)
    parser.add_argument("--source", required=True,
                        help="checkpoint (.pth, .bin, .safetensors) or transformers model folder")
    parser.add_argument("--output", required=True,
                        help="converted checkpoint to write (.pth); with --to transformers a folder")
    parser.add_argument("--to", choices=("detr_d2", "transformers"), default="detr_d2",
                        help="what to write (default: %(default)s)")
    parser.add_argument("--config-file", metavar="FILE",
                        help="with --to transformers: the detr_d2 config of the --source model")
    parser.add_argument("--backbone-format", choices=("auto", "timm", "transformers"), default="auto",
                        help="with --to transformers: timm ResNet (standard ResNets; the Hub's DETR models) or "
                             "transformers' ResNetBackbone (any widths); auto: timm when the ResNet is standard")
    parser.add_argument("--drop-class-head", action="store_true",
                        help="leave the class head out, to fine-tune on other classes")
    parser.add_argument("--keep-classes", action="store_true",
                        help="keep a COCO class head as it is (the reference's 91 outputs of Deformable DETR and "
                             "DINO, 92 of DETR) instead of remapping it to detectron2's 80 classes")
    add_trust_pickle(parser, what="--source")
    add_config_overrides(parser, example="MODEL.DETR.NUM_OBJECT_QUERIES 300 (with --to transformers: "
                                         "overrides of --config-file; else written into OUT.yaml where the "
                                         "weights do not fix them)")
    return parser


def say(text):
    print(f"convert_detr_checkpoint: {text}")


# ---------------------------------------------------------------- to detr_d2
def set_option(cfg, key, value):
    """``cfg.<key> = value`` in the type of the key's default (5 -> 5.0 for a float key)."""
    node = cfg
    *parents, leaf = key.split(".")
    for name in parents:
        node = node[name]
    default = node[leaf]
    if isinstance(default, (float, tuple, list, str)) or isinstance(default, int) and not isinstance(default, bool):
        value = type(default)(value)
    node[leaf] = value


def write_config(path, reading, source, weights_path):
    """The detr_d2 config of a converted transformers model, written to ``path``."""
    options, notes = detr_d2_options(reading.state_dict, any(k.startswith("mask_head.") for k in reading.state_dict),
                                     source.hf_config, source.preprocessor)
    cfg = add_detr_config(get_cfg())
    cfg.merge_from_file(str(BASE_CONFIG))
    for key, value in options:
        set_option(cfg, key, value)
    cfg.MODEL.WEIGHTS = os.path.abspath(weights_path)
    coco = reading.class_names is not None and len(reading.class_names) == 80 and reading.dataset_ids[0] == 1
    if not coco:  # classes of no registered dataset: none to check against, names from the metadata file
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    atomic_write(path, lambda f: f.write(cfg.dump()), binary=False)
    return notes


class ConfigDumper(yaml.SafeDumper):
    """Block mappings, lists on one line (as detectron2's configs write them)."""


ConfigDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value,
                                                                                   flow_style=True))


def plain_value(value):
    """A config value as yaml.safe_dump writes it (tuples as lists)."""
    return [plain_value(v) for v in value] if isinstance(value, (list, tuple)) else value


def layout_config(reading, source, weights_path, opts):
    """(OUT.yaml text, notes of what was assumed) for weights that fix their model's config
    (``reading.config``): ``_BASE_`` the layout's base config, then the keys the weights (and
    --opts) set. SetupError for --opts keys or values the config does not take."""
    options, notes = reading.config(source.extras.get("args"))
    base = CONFIGS / reading.layout.base_config
    cfg = merge_config(add_detr_config(get_cfg()), str(base), [])
    for key, value in options:
        set_option(cfg, key, value)
    merge_config(cfg, None, list(opts))
    keys = ["MODEL.WEIGHTS"] + [key for key, _ in options] + list(opts[0::2])
    if cfg.MODEL.DETR.NUM_CLASSES not in (None, 80):  # classes of no registered dataset
        keys += ["DATASETS.TRAIN", "DATASETS.TEST"]
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    cfg.MODEL.WEIGHTS = os.path.abspath(weights_path)
    data = {"_BASE_": str(base)}
    for key in keys:
        *parents, leaf = key.split(".")
        node, target = cfg, data
        for name in parents:
            node, target = node[name], target.setdefault(name, {})
        target[leaf] = plain_value(node[leaf])
    origin = f"{reading.layout.title}: {os.path.abspath(source.path)} converted by tools/convert_detr_checkpoint.py"
    header = "".join(f"# {line}\n" for line in [origin, *reading.notes, *notes])
    return header + yaml.dump(data, Dumper=ConfigDumper, sort_keys=False, default_flow_style=False), notes


def to_detr_d2(args):
    source = read_source(args.source, trust_pickle=args.trust_pickle)
    id2label = (source.hf_config or {}).get("id2label")
    reading = read_layout(source.state_dict, args.source, drop_class_head=args.drop_class_head, id2label=id2label,
                          keep_classes=args.keep_classes)
    if args.opts and reading.layout.config_options is None:
        raise SetupError(f"--opts sets keys of the config written beside converted weights, and {args.source} "
                         f"({reading.layout.title}) gets none: set them in your config instead")
    config_path = os.path.splitext(args.output)[0] + ".yaml"
    fixed_config = (layout_config(reading, source, args.output, args.opts)
                    if reading.layout.config_options is not None else None)
    atomic_torch_save({"model": reading.state_dict, "__author__": "detr_d2 convert_detr_checkpoint",
                       "matching_heuristics": False}, args.output)
    say(f"read the checkpoint layout of {reading.layout.title}")
    for note in reading.notes:
        say(note)
    say(f"wrote {len(reading.state_dict)} tensors to {args.output}")
    if reading.class_names is not None:
        say(f"wrote the {len(reading.class_names)} class names to "
            f"{write_class_metadata(args.output, reading.class_names, reading.dataset_ids, args.source)}")
    if fixed_config is not None:
        text, notes = fixed_config
        atomic_write(config_path, lambda f: f.write(text), binary=False)
    elif reading.layout is TRANSFORMERS and not args.drop_class_head:
        notes = write_config(config_path, reading, source, args.output)
    else:
        return
    for note in notes:
        say(note)
    say(f"wrote its config to {config_path}: python tools/demo.py --config-file {config_path} --input IMAGES "
        "--output DIR")


# ---------------------------------------------------------------- to transformers
def export_config(args, state_dict):
    if not args.config_file:
        raise SetupError("--to transformers needs --config-file: the detr_d2 config of the --source model")
    cfg = merge_config(add_detr_config(get_cfg()), args.config_file, args.opts)
    if "class_embed.weight" not in state_dict:
        raise SetupError(f"{args.source} has no class head (class_embed) to export")
    if cfg.MODEL.DETR.NUM_CLASSES is None:
        cfg.MODEL.DETR.NUM_CLASSES = state_dict["class_embed.weight"].shape[0] - 1
    has_masks = any(key.startswith("mask_head.") for key in state_dict)
    if has_masks != bool(cfg.MODEL.MASK_ON):
        raise SetupError(f"{args.source} {'has' if has_masks else 'has no'} mask head but {args.config_file} has "
                         f"MODEL.MASK_ON {cfg.MODEL.MASK_ON}; give the config the model was trained with")
    return cfg


def class_names_for_export(args, cfg, num_classes):
    """The names beside --source, else of the config's datasets, else LABEL_i."""
    found = read_class_metadata(args.source)
    if found and len(found[0]) == num_classes:
        return found[0]
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        names = MetadataCatalog.get(name).get("thing_classes", None) if name in DatasetCatalog.list() else None
        if names and len(names) == num_classes:
            return list(names)
    say(f"no class names found (beside {args.source} or in the config's datasets): labels LABEL_0 ...")
    return [f"LABEL_{i}" for i in range(num_classes)]


def to_transformers(args):
    source = read_source(args.source, trust_pickle=args.trust_pickle)
    reading = read_layout(source.state_dict, args.source)
    state_dict = reading.state_dict
    cfg = export_config(args, state_dict)
    flavour = backbone_format(cfg, resnet_spec(state_dict)) if args.backbone_format == "auto" else args.backbone_format
    names = class_names_for_export(args, cfg, state_dict["class_embed.weight"].shape[0] - 1)
    config = transformers_config(cfg, state_dict, names, flavour)
    hf_state = detr_d2_to_transformers(state_dict, bool(cfg.MODEL.MASK_ON), flavour)
    write_transformers_folder(args.output, hf_state, config, preprocessor_config(cfg))
    say(f"read the checkpoint layout of {reading.layout.title}")
    say(f"wrote {config['architectures'][0]} ({flavour} ResNet backbone, {len(names)} classes, {len(hf_state)} "
        f"tensors) to {args.output}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        (to_transformers if args.to == "transformers" else to_detr_d2)(args)
    except SetupError as error:
        print(f"convert_detr_checkpoint: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
