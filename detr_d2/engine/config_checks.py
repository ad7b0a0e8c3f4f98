"""Checks of a config's values, and of the device and files they name, before heavy work.

Each check raises ``SetupError`` naming the key (or file) and the fix, so that a mistake
is reported before a model is built, weights are loaded or training starts.
"""
import math
import os
import tempfile

import torch

from detr_d2.engine.precision import AUTO, PRECISIONS, check_precision
from detr_d2.errors import SetupError
from detr_d2.modeling import DeformableDetr
from detr_d2.modeling.mask_head import mask_head_size_problems
from detr_d2.modeling.multi_scale.neck import GROUP_NORM_GROUPS

__all__ = [
    "check_amp",
    "check_device",
    "check_model_config",
    "check_output_dir",
    "check_weights_file",
    "check_weights_to_load",
]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition, key, value, rule, fix):
    """SetupError "KEY is VALUE but must be RULE; FIX" unless ``condition``."""
    if not condition:
        raise SetupError(f"{key} is {value!r} but must be {rule}; {fix}")


def _check_detr_sizes(detr):
    """NUM_CLASSES unset or positive; positive layer and query sizes; HIDDEN_DIM divisible
    by NHEADS (and by 4 for sine position embeddings)."""
    num_classes = detr.NUM_CLASSES
    _require(num_classes is None or (_is_int(num_classes) and num_classes >= 1),
             "MODEL.DETR.NUM_CLASSES", num_classes, "a positive integer (object classes, without the "
             "no-object class)", "remove the key to take the count from DATASETS.TRAIN, or fix it")
    for key in ("HIDDEN_DIM", "NHEADS", "NUM_OBJECT_QUERIES", "DIM_FEEDFORWARD", "DEC_LAYERS"):
        _require(_is_int(detr[key]) and detr[key] >= 1, f"MODEL.DETR.{key}", detr[key],
                 "a positive integer", "fix the value")
    _require(_is_int(detr.ENC_LAYERS) and detr.ENC_LAYERS >= 0, "MODEL.DETR.ENC_LAYERS",
             detr.ENC_LAYERS, "an integer >= 0", "fix the value")
    _require(detr.HIDDEN_DIM % detr.NHEADS == 0, "MODEL.DETR.HIDDEN_DIM", detr.HIDDEN_DIM,
             f"divisible by MODEL.DETR.NHEADS ({detr.NHEADS}): each attention head gets "
             "HIDDEN_DIM / NHEADS channels",
             f"e.g. MODEL.DETR.HIDDEN_DIM {max(detr.HIDDEN_DIM // detr.NHEADS, 1) * detr.NHEADS}")
    multiple = 4 if detr.POSITION_EMBEDDING == "sine" else 2  # y/x halves; sin/cos pairs
    _require(detr.HIDDEN_DIM % multiple == 0, "MODEL.DETR.HIDDEN_DIM", detr.HIDDEN_DIM,
             f"a multiple of {multiple} with MODEL.DETR.POSITION_EMBEDDING {detr.POSITION_EMBEDDING!r} "
             "(the position features are split between y and x)", "fix the value")


def _check_detr_options(detr):
    """DROPOUT in [0, 1)."""
    _require(0.0 <= detr.DROPOUT < 1.0, "MODEL.DETR.DROPOUT", detr.DROPOUT, "in [0, 1)", "fix the value")


def _check_masks(model):
    """With MASK_ON: HIDDEN_DIM/NHEADS the mask head can use. FROZEN_WEIGHTS: only with
    MASK_ON (it freezes everything but the mask head), a local file that exists."""
    detr = model.DETR
    if model.MASK_ON:
        problems = mask_head_size_problems(detr.HIDDEN_DIM, detr.NHEADS)
        _require(not problems, "MODEL.DETR.HIDDEN_DIM", detr.HIDDEN_DIM,
                 f"usable by the mask head of MODEL.MASK_ON: {'; '.join(problems)}",
                 "e.g. MODEL.DETR.HIDDEN_DIM 256 with MODEL.DETR.NHEADS 8")
    if not detr.FROZEN_WEIGHTS:
        return
    _require(model.MASK_ON, "MODEL.DETR.FROZEN_WEIGHTS", detr.FROZEN_WEIGHTS,
             "empty without MODEL.MASK_ON (it freezes the detector to train the mask head only)",
             "add MODEL.MASK_ON True, or give the checkpoint to start from as MODEL.WEIGHTS")
    _require(os.path.isfile(detr.FROZEN_WEIGHTS), "MODEL.DETR.FROZEN_WEIGHTS", detr.FROZEN_WEIGHTS,
             "an existing detector checkpoint file", "give the path of the trained box model (.pth)")


def _check_panoptic(model):
    """PANOPTIC_ON only with MASK_ON; PANOPTIC_THRESHOLD in [0, 1); PANOPTIC_THING_IDS
    unset or distinct integers >= 0 (their upper bound, NUM_CLASSES, is checked once known)."""
    detr = model.DETR
    _require(isinstance(detr.PANOPTIC_ON, bool), "MODEL.DETR.PANOPTIC_ON", detr.PANOPTIC_ON, "True or False",
             "True adds panoptic_seg to the inference output (with MODEL.MASK_ON)")
    _require(not detr.PANOPTIC_ON or model.MASK_ON, "MODEL.DETR.PANOPTIC_ON", detr.PANOPTIC_ON,
             "False without MODEL.MASK_ON (the panoptic segments are the mask head's masks)",
             "add MODEL.MASK_ON True, or use a *_panoptic config")
    _require(0.0 <= detr.PANOPTIC_THRESHOLD < 1.0, "MODEL.DETR.PANOPTIC_THRESHOLD", detr.PANOPTIC_THRESHOLD,
             "in [0, 1) (a class probability a query must exceed)", "the reference uses 0.85")
    thing_ids = detr.PANOPTIC_THING_IDS
    _require(thing_ids is None or (isinstance(thing_ids, (list, tuple)) and all(_is_int(c) and c >= 0 for c in thing_ids)
                                   and len(set(thing_ids)) == len(thing_ids)),
             "MODEL.DETR.PANOPTIC_THING_IDS", thing_ids, "unset (None) or a list of distinct contiguous class ids",
             "remove the key to take the thing classes from DATASETS.TRAIN's metadata, or fix it")


def _multi_scale_architectures():
    """The registered names (class names) of DeformableDetr and its subclasses."""
    names, classes = set(), [DeformableDetr]
    while classes:
        cls = classes.pop()
        names.add(cls.__name__)
        classes.extend(cls.__subclasses__())
    return names


def _is_multi_scale(model):
    """Whether MODEL.META_ARCHITECTURE names DeformableDetr or a subclass of it."""
    return model.META_ARCHITECTURE in _multi_scale_architectures()


def _refuse_detr_only_options(model):
    """The DETR options a multi-scale architecture does not have, each refused by its key."""
    detr, name = model.DETR, model.META_ARCHITECTURE
    refusals = (  # key, value, supported, (the supported value, why)
        ("MODEL.MASK_ON", model.MASK_ON, not model.MASK_ON, ("False", "it has no mask head")),
        ("MODEL.DETR.PANOPTIC_ON", detr.PANOPTIC_ON, not detr.PANOPTIC_ON, ("False", "it has no mask head")),
        ("MODEL.DETR.FROZEN_WEIGHTS", detr.FROZEN_WEIGHTS, not detr.FROZEN_WEIGHTS,
         ("empty", "it has no mask head to train on a frozen detector")),
        ("MODEL.DETR.NUM_QUERY_GROUPS", detr.NUM_QUERY_GROUPS, detr.NUM_QUERY_GROUPS == 1,
         ("1", "query groups are a training aid of 'Detr'")),
        ("MODEL.DETR.POSITION_EMBEDDING", detr.POSITION_EMBEDDING, detr.POSITION_EMBEDDING == "sine",
         ("'sine'", "its levels' encoding is set by MODEL.MULTI_SCALE.POSITION_*")),
        ("MODEL.DETR.PRE_NORM", detr.PRE_NORM, not detr.PRE_NORM, ("False", "its layers normalise after each block")),
    )
    for key, value, supported, (rule, reason) in refusals:
        _require(supported, key, value, f"{rule} with MODEL.META_ARCHITECTURE {name!r} ({reason})",
                 "remove the key, or use MODEL.META_ARCHITECTURE 'Detr'")


def _check_multi_scale(model):
    """For DeformableDetr (and its subclasses): the DETR-only options refused, and the
    MODEL.MULTI_SCALE values it can build (levels, points, top-k, focal parameters)."""
    if not _is_multi_scale(model):
        return
    _refuse_detr_only_options(model)
    multi_scale, hidden_dim = model.MULTI_SCALE, model.DETR.HIDDEN_DIM
    in_features = multi_scale.IN_FEATURES
    _require(isinstance(in_features, (list, tuple)) and in_features and all(isinstance(f, str) for f in in_features),
             "MODEL.MULTI_SCALE.IN_FEATURES", in_features, "a non-empty list of backbone output names",
             "e.g. ['res3', 'res4', 'res5']")
    _require(_is_int(multi_scale.NUM_FEATURE_LEVELS) and multi_scale.NUM_FEATURE_LEVELS >= len(in_features),
             "MODEL.MULTI_SCALE.NUM_FEATURE_LEVELS", multi_scale.NUM_FEATURE_LEVELS,
             f"an integer >= the {len(in_features)} MODEL.MULTI_SCALE.IN_FEATURES (the levels beyond them "
             "are extra stride-2 convolutions)",
             f"e.g. MODEL.MULTI_SCALE.NUM_FEATURE_LEVELS {len(in_features) + 1}")
    for key in ("ENC_N_POINTS", "DEC_N_POINTS", "TOPK_DETECTIONS"):
        _require(_is_int(multi_scale[key]) and multi_scale[key] >= 1, f"MODEL.MULTI_SCALE.{key}", multi_scale[key],
                 "a positive integer", "fix the value")
    _require(0.0 <= multi_scale.FOCAL_ALPHA <= 1.0, "MODEL.MULTI_SCALE.FOCAL_ALPHA", multi_scale.FOCAL_ALPHA,
             "in [0, 1]", "the reference uses 0.25")
    _require(multi_scale.FOCAL_GAMMA >= 0.0, "MODEL.MULTI_SCALE.FOCAL_GAMMA", multi_scale.FOCAL_GAMMA,
             ">= 0", "the reference uses 2")
    _require(hidden_dim % GROUP_NORM_GROUPS == 0, "MODEL.DETR.HIDDEN_DIM", hidden_dim,
             f"a multiple of {GROUP_NORM_GROUPS} with MODEL.META_ARCHITECTURE {model.META_ARCHITECTURE!r} "
             f"(the multi-scale neck's GroupNorm has {GROUP_NORM_GROUPS} groups)",
             f"e.g. MODEL.DETR.HIDDEN_DIM {max(1, round(hidden_dim / GROUP_NORM_GROUPS)) * GROUP_NORM_GROUPS}")


def _check_solver(solver):
    """A non-negative, finite BASE_LR; at least one image per batch; a known AMP precision."""
    _require(math.isfinite(solver.BASE_LR) and solver.BASE_LR >= 0, "SOLVER.BASE_LR", solver.BASE_LR,
             "a finite number >= 0", "fix the value")
    _require(solver.IMS_PER_BATCH >= 1, "SOLVER.IMS_PER_BATCH", solver.IMS_PER_BATCH,
             "at least 1", "fix the value")
    _require(solver.AMP.PRECISION in (AUTO, *PRECISIONS), "SOLVER.AMP.PRECISION", solver.AMP.PRECISION,
             "'' (auto), 'bfloat16' or 'float16'",
             "'' picks bfloat16 on the CPU and float16 on CUDA")


def _check_test(test):
    """TEST.COCO_EVAL_IMPL names a COCOeval; TEST.EVAL_LOSSES and TEST.AMP.ENABLED are bools."""
    _require(test.COCO_EVAL_IMPL in ("fast", "official"), "TEST.COCO_EVAL_IMPL", test.COCO_EVAL_IMPL,
             "'fast' or 'official'", "'fast' (C++ COCOeval, the default) or 'official' (pycocotools)")
    _require(isinstance(test.EVAL_LOSSES, bool), "TEST.EVAL_LOSSES", test.EVAL_LOSSES, "True or False",
             "True computes DETR's criterion on the test sets at each evaluation")
    _require(isinstance(test.AMP.ENABLED, bool), "TEST.AMP.ENABLED", test.AMP.ENABLED, "True or False",
             "True runs inference under autocast (SOLVER.AMP.PRECISION)")


def check_model_config(cfg):
    """Values of MODEL.DETR, MODEL.MULTI_SCALE, MODEL.MASK_ON and SOLVER that would fail deep
    inside model building or training, or that the architecture would ignore."""
    _check_detr_sizes(cfg.MODEL.DETR)
    _check_detr_options(cfg.MODEL.DETR)
    _check_multi_scale(cfg.MODEL)
    _check_masks(cfg.MODEL)
    _check_panoptic(cfg.MODEL)
    _check_solver(cfg.SOLVER)
    _check_test(cfg.TEST)


def check_output_dir(cfg):
    """OUTPUT_DIR must be a folder this process can create and write files in."""
    folder = cfg.OUTPUT_DIR
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SetupError(f"OUTPUT_DIR {folder} cannot be written ({e.strerror or e}: "
                         f"{e.filename or folder}); choose another OUTPUT_DIR, e.g. "
                         "`OUTPUT_DIR ./output`.") from e


def check_device(cfg):
    """MODEL.DEVICE must name a device this machine has."""
    try:
        device = torch.device(cfg.MODEL.DEVICE)
    except RuntimeError as e:
        raise SetupError(f"MODEL.DEVICE {cfg.MODEL.DEVICE!r} is not a torch device: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} (detectron2's default) but no "
                         "CUDA device is available; add `MODEL.DEVICE cpu` to the command line.")


def check_amp(cfg):
    """Mixed precision (SOLVER.AMP.ENABLED, TEST.AMP.ENABLED) in a dtype that MODEL.DEVICE can
    autocast to (``precision.check_precision``); warns once when the CPU only emulates it."""
    check_precision(cfg)


def check_weights_file(path):
    """A local MODEL.WEIGHTS file must exist (URLs such as detectron2:// are not checked)."""
    if path and "://" not in path and not os.path.isfile(path):
        raise SetupError(f"MODEL.WEIGHTS {path} does not exist; give the path of a checkpoint "
                         "(.pth/.pkl) or leave MODEL.WEIGHTS empty to start from scratch.")


def check_weights_to_load(cfg, resume):
    """The file that ``resume_or_load(resume)`` will read must exist.

    With ``resume`` and a ``last_checkpoint`` in OUTPUT_DIR, that is the checkpoint it
    names; otherwise MODEL.WEIGHTS.
    """
    last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    if not (resume and os.path.isfile(last)):
        check_weights_file(cfg.MODEL.WEIGHTS)
        return
    with open(last) as f:
        checkpoint = os.path.join(cfg.OUTPUT_DIR, f.read().strip())
    if not os.path.isfile(checkpoint):
        raise SetupError(f"--resume: {last} names {checkpoint}, which does not exist; delete "
                         f"{last} (or point it at an existing checkpoint) to resume from there.")
