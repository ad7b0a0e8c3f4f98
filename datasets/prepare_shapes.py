"""Deterministic synthetic shape-detection datasets in COCO format.

The command line of ``detr_d2.data.shapes`` (whose docstring describes the images, the
boxes, the folder layout and the determinism): the same arguments give byte-identical
files, and a run whose output is already complete is skipped.

Usage::

    python datasets/prepare_shapes.py --preset pretrain --splits train:2000,val:200
    python datasets/prepare_shapes.py --preset custom --output /tmp/shapes_custom
    python datasets/prepare_shapes.py --classes star,circle --output DIR --seed 3
    python datasets/prepare_shapes.py --preset panoptic     (COCO-panoptic: things + sky/ground/water)

The default output folder is ``datasets/shapes_<preset>`` (or ``shapes_<class>-<class>...``).
"""
import argparse
import os
import sys

from detr_d2.data.shapes import (
    DEFAULT_SPLITS,
    KNOWN_SHAPES,
    PANOPTIC_PRESETS,
    PRESETS,
    ImageSettings,
    generate_dataset,
    generate_panoptic_dataset,
)


def parse_splits(text):
    """Parse ``train:2000,val:200`` into ``{"train": 2000, "val": 200}``."""
    splits = {}
    for item in text.split(","):
        name, sep, count = item.strip().partition(":")
        if not sep or not name or not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"bad split {item!r}; expected NAME:COUNT")
        splits[name] = int(count)
    return splits


def parse_classes(text):
    """Parse ``star,circle`` into a list of known shape names."""
    classes = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in classes if c not in KNOWN_SHAPES]
    if not classes or unknown:
        raise argparse.ArgumentTypeError(f"unknown shapes {unknown}; known: {', '.join(KNOWN_SHAPES)}")
    return classes


def _presets_epilog():
    """Help text listing the presets."""
    lines = [f"  {name}: {', '.join(classes)}" for name, classes in PRESETS.items()]
    return "presets:\n" + "\n".join(lines)


def build_parser():
    """The command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=_presets_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=sorted(PRESETS), help="named class list")
    which.add_argument("--classes", type=parse_classes, help=f"comma list from {','.join(KNOWN_SHAPES)}")
    parser.add_argument("--output", help="output folder (default: datasets/shapes_<preset or classes>)")
    parser.add_argument("--splits", type=parse_splits, default=dict(DEFAULT_SPLITS),
                        help="NAME:COUNT list (default: train:2000,val:200)")
    defaults = ImageSettings()
    for option, help_text in (("--image-size", "square image side (px)"),
                              ("--min-objects", "objects per image, at least"),
                              ("--max-objects", "objects per image, at most"),
                              ("--min-size", "smallest object: longer side of its box (px)"),
                              ("--max-size", "largest object: longer side of its box (px)")):
        default = getattr(defaults, option[2:].replace("-", "_"))
        parser.add_argument(option, type=int, default=default, help=f"{help_text}; default {default}")
    parser.add_argument("--seed", type=int, default=0, help="same seed and arguments, same files")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    return parser


def main(argv=None):
    """CLI entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    classes = list(PRESETS[args.preset]) if args.preset else args.classes
    output = args.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "shapes_" + (args.preset or "-".join(classes)))
    generate = generate_panoptic_dataset if args.preset in PANOPTIC_PRESETS else generate_dataset
    try:
        generate(output, classes, args.splits, image_size=args.image_size,
                 min_objects=args.min_objects, max_objects=args.max_objects,
                 min_size=args.min_size, max_size=args.max_size, seed=args.seed,
                 force=args.force)
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
