#!/usr/bin/env python
"""Convert a reference DETR checkpoint (facebookresearch/detr) for detr_d2.

    python tools/convert_detr_checkpoint.py --source detr-r50-e632da11.pth --output detr_r50.pth
    python tools/convert_detr_checkpoint.py --source REF.pth --output OUT.pth --drop-class-head

The output loads with ``MODEL.WEIGHTS OUT.pth`` into the model of the matching config
(configs/detr_r50.yaml, detr_r50_dc5.yaml, detr_r101.yaml, detr_r101_dc5.yaml). It is
written atomically: an interrupted run never leaves a half-written file.
"""
import argparse
import sys

from detr_d2.checkpoint import atomic_torch_save, convert_state_dict, extract_state_dict, load_checkpoint_file
from detr_d2.errors import SetupError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="reference checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument("--drop-class-head", action="store_true",
                        help="leave the class head out, to fine-tune on other classes")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickled objects in --source (runs code from the file; "
                             "only for files whose origin you trust)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        checkpoint = load_checkpoint_file(args.source, trust_pickle=args.trust_pickle)
        state_dict, report = convert_state_dict(extract_state_dict(checkpoint, args.source),
                                                drop_class_head=args.drop_class_head, source=args.source)
    except SetupError as error:
        print(f"convert_detr_checkpoint: error: {error}", file=sys.stderr)
        return 2
    atomic_torch_save({"model": state_dict, "__author__": "detr_d2 convert_detr_checkpoint",
                       "matching_heuristics": False}, args.output)
    for note in report["notes"]:
        print(f"convert_detr_checkpoint: {note}")
    print(f"convert_detr_checkpoint: wrote {len(state_dict)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
