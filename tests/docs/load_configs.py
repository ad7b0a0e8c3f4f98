"""Load each config given on the command line with detr_d2's build_config, as the tools do,
and print one JSON result per config: {"config", "ok", "error", "num_classes", "without_data"}.

    python tests/docs/load_configs.py [--with-data] CONFIG ...

Without --with-data (the repository's configs) the config is built as the tools build it
(dataset names need not be registered). A config whose datasets or FROZEN_WEIGHTS name files
that a demo or a run creates (absent in a fresh checkout) is built without them:
registrations, dataset names and FROZEN_WEIGHTS emptied, NUM_CLASSES 2 and, for panoptic,
class 0 a thing, where the config leaves them to the data; `without_data` lists those files.
With --with-data (a config the docs ask the reader to write, run beside generated data) it
is built as training builds it: every dataset registered and NUM_CLASSES from the data.
"""
import json
import os
import sys

import detr_d2  # noqa: F401  (applies the compat fixes first)
from detectron2.config import get_cfg

from detr_d2.config import add_detr_config
from detr_d2.engine import build_config, merge_config


def files_named(cfg):
    """The data files and FROZEN_WEIGHTS a config names."""
    files = [path for entry in cfg.DATASETS.REGISTER_COCO for path in entry[1:]]
    files += [path for entry in cfg.DATASETS.REGISTER_COCO_PANOPTIC for path in entry[1:]]
    if cfg.MODEL.DETR.FROZEN_WEIGHTS:
        files.append(cfg.MODEL.DETR.FROZEN_WEIGHTS)
    return files


def overrides_without_data(cfg):
    """KEY VALUE pairs that build ``cfg`` with no dataset and no frozen detector."""
    opts = ["DATASETS.REGISTER_COCO", "()", "DATASETS.REGISTER_COCO_PANOPTIC", "()",
            "DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.DETR.FROZEN_WEIGHTS", ""]
    if cfg.MODEL.DETR.NUM_CLASSES is None:
        opts += ["MODEL.DETR.NUM_CLASSES", "2"]
    if cfg.MODEL.DETR.PANOPTIC_ON and cfg.MODEL.DETR.PANOPTIC_THING_IDS is None:
        opts += ["MODEL.DETR.PANOPTIC_THING_IDS", "[0]"]
    return opts


def load(config_file, with_data):
    result = {"config": config_file, "ok": False, "error": None, "num_classes": None, "without_data": []}
    try:
        raw = merge_config(add_detr_config(get_cfg()), config_file, [])
        opts = []
        if not with_data:
            result["without_data"] = [path for path in files_named(raw) if not os.path.exists(path)]
            if result["without_data"]:
                opts = overrides_without_data(raw)
        cfg = build_config(config_file, opts, all_datasets_registered=with_data)
        result.update(ok=True, num_classes=cfg.MODEL.DETR.NUM_CLASSES)
    except Exception as error:  # reported to the test, which names the config and the page
        result["error"] = f"{type(error).__name__}: {error}"
    return result


def main(argv):
    with_data = "--with-data" in argv
    configs = [arg for arg in argv if arg != "--with-data"]
    print(json.dumps([load(config_file, with_data) for config_file in configs]))


if __name__ == "__main__":
    main(sys.argv[1:])
