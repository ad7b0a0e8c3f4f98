"""The command-line arguments the tools share, each defined once, and their types.

Config overrides (``KEY VALUE`` pairs merged over the config file) come at the end of the
command in either of detectron2's two spellings: positional, as its tools/train_net.py takes
them, or after ``--opts``, as its demo takes them; both may be combined (``A 1 --opts B 2``
is ``A 1 B 2``). Everything after the first override is an override.
"""
import argparse
import re
import sys

__all__ = ["OPTS_FLAG", "ToolArgumentParser", "add_config_arguments", "add_config_overrides",
           "add_confidence_threshold", "add_image_inputs", "add_trust_pickle", "fraction", "input_size",
           "overrides_as_positional", "positive_float", "positive_int"]

OPTS_FLAG = "--opts"


def overrides_as_positional(argv):
    """``argv`` with the ``--opts`` tokens left out: the overrides after them then read as
    positional ones (both forms end the command, so this is all that tells them apart)."""
    return [token for token in argv if token != OPTS_FLAG]


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse's parser, described by the first paragraph of ``doc`` (the rest of it is
    shown by ``--help`` as written), reading ``--opts`` overrides as positional ones."""

    def __init__(self, doc, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=doc.split("\n\n")[0], **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(overrides_as_positional(sys.argv[1:] if args is None else args), namespace)


def add_config_overrides(parser, positional=True, example="MODEL.WEIGHTS model.pth MODEL.DEVICE cpu"):
    """The overrides: ``args.opts``, a list of KEY VALUE strings (empty without any).

    ``positional=False`` for a parser that has the positional ``opts`` already
    (detectron2's ``default_argument_parser``): it gets ``--opts`` only."""
    if positional:
        parser.add_argument("opts", nargs=argparse.REMAINDER, action="extend", default=[], metavar="KEY VALUE",
                            help=f"config overrides at the end of the command, e.g. {example}")
    parser.add_argument(OPTS_FLAG, nargs=argparse.REMAINDER, action="extend", default=[], dest="opts",
                        metavar="KEY VALUE", help="the same overrides, after --opts (detectron2's demo spelling)")


def add_config_arguments(parser, required=True, help="config of the model", **override_help):
    """``--config-file FILE`` and the config overrides."""
    parser.add_argument("--config-file", required=required, metavar="FILE", help=help)
    add_config_overrides(parser, **override_help)


def add_image_inputs(parser, help="image files, folders or glob patterns"):
    """``--input PATH [PATH ...]``: files, folders (the images directly inside), glob patterns."""
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH", help=help)


def add_confidence_threshold(parser, help="keep detections scoring at least this"):
    """``--confidence-threshold T`` (0..1, default 0.5)."""
    parser.add_argument("--confidence-threshold", type=fraction, default=0.5, help=f"{help} (default: %(default)s)")


def add_trust_pickle(parser, what="MODEL.WEIGHTS"):
    """``--trust-pickle``: read ``what`` with full unpickling (runs code from the file)."""
    parser.add_argument("--trust-pickle", action="store_true",
                        help=f"read {what} with full unpickling, which runs code from the file: "
                             "only for files whose origin you trust")


# ---------------------------------------------------------------- argument types
def fraction(text):
    """argparse type: a number between 0 and 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def positive_float(text):
    """argparse type: a finite number above 0."""
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def input_size(text):
    """argparse type: "HxW" -> (H, W)."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match or 0 in (int(match[1]), int(match[2])):
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers, e.g. 800x1066; got {text!r}")
    return int(match[1]), int(match[2])
