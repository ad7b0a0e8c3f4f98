"""MODEL.DETR.PANOPTIC_THING_IDS from the data: which contiguous classes are things.

A panoptic dataset in detectron2's standard form (the builtin ``coco_2017_*_panoptic``,
``DATASETS.REGISTER_COCO_PANOPTIC``, detectron2's ``register_coco_panoptic``) numbers all its
categories, things and stuff, 0..K-1, and its metadata maps dataset ids to those
contiguous ids in ``thing_dataset_id_to_contiguous_id`` (things) and
``stuff_dataset_id_to_contiguous_id`` (stuff). With MODEL.DETR.PANOPTIC_ON, ``build_config``
takes the thing ids from there (like NUM_CLASSES), so the model never reads datasets and a
run's config.yaml holds them.
"""
from detectron2.data import MetadataCatalog

from detr_d2.engine.datasets import check_dataset_names
from detr_d2.errors import SetupError

__all__ = ["panoptic_thing_ids", "resolve_panoptic_thing_ids"]

KEY = "MODEL.DETR.PANOPTIC_THING_IDS"


def panoptic_thing_ids(name, num_classes):
    """Sorted contiguous thing ids of the registered panoptic dataset ``name``, whose thing
    and stuff ids must cover 0..num_classes-1 once each."""
    metadata = MetadataCatalog.get(name)
    things = metadata.get("thing_dataset_id_to_contiguous_id", None)
    stuff = metadata.get("stuff_dataset_id_to_contiguous_id", None)
    if things is None or stuff is None:
        raise SetupError(f"MODEL.DETR.PANOPTIC_ON: dataset {name!r} has no panoptic metadata "
                         "(thing_dataset_id_to_contiguous_id and stuff_dataset_id_to_contiguous_id); train on "
                         "a panoptic dataset (DATASETS.REGISTER_COCO_PANOPTIC, coco_2017_*_panoptic) or set "
                         f"{KEY} to the contiguous ids of the thing classes")
    thing_ids = sorted(things.values())
    if sorted(thing_ids + list(stuff.values())) != list(range(num_classes)):
        raise SetupError(f"MODEL.DETR.PANOPTIC_ON: dataset {name!r} numbers its {len(things)} thing and "
                         f"{len(stuff)} stuff classes otherwise than 0..{num_classes - 1} (MODEL.DETR.NUM_CLASSES) "
                         "once each; DETR predicts things and stuff with one class head, so register the set "
                         "with detectron2's standard panoptic metadata (not the *_separated form)")
    return thing_ids


def _thing_ids_of(names, num_classes):
    """The thing ids the datasets ``names`` agree on."""
    found = {name: panoptic_thing_ids(name, num_classes) for name in names}
    if len({tuple(ids) for ids in found.values()}) != 1:
        raise SetupError(f"the datasets {', '.join(names)} disagree on which classes are things "
                         f"({found}); train on datasets with the same categories")
    return next(iter(found.values()))


def _check_range(thing_ids, num_classes):
    outside = [c for c in thing_ids if c >= num_classes]
    if outside:
        raise SetupError(f"{KEY} is {list(thing_ids)} but {outside} are not contiguous class ids "
                         f"0..{num_classes - 1} (MODEL.DETR.NUM_CLASSES {num_classes}); fix it or remove it")


def resolve_panoptic_thing_ids(cfg, compare_with_data=True):
    """With MODEL.DETR.PANOPTIC_ON (after NUM_CLASSES is known): fill PANOPTIC_THING_IDS
    from DATASETS.TRAIN (or, when empty, DATASETS.TEST) when unset; with
    ``compare_with_data``, an explicit value must equal the data's when those datasets
    carry panoptic metadata. Returns the ids (None when PANOPTIC_ON is off)."""
    detr = cfg.MODEL.DETR
    if not detr.PANOPTIC_ON:
        return None
    names = cfg.DATASETS.TRAIN or cfg.DATASETS.TEST
    key = "DATASETS.TRAIN" if cfg.DATASETS.TRAIN else "DATASETS.TEST"
    if detr.PANOPTIC_THING_IDS is None:
        if not names:
            raise SetupError(f"MODEL.DETR.PANOPTIC_ON needs the thing classes: name a panoptic dataset in "
                             f"DATASETS.TRAIN, or set {KEY} to the contiguous ids of the thing classes")
        check_dataset_names(names, key)
        detr.PANOPTIC_THING_IDS = _thing_ids_of(names, detr.NUM_CLASSES)
    elif compare_with_data and names:
        panoptic = [name for name in names
                    if MetadataCatalog.get(name).get("stuff_dataset_id_to_contiguous_id", None) is not None]
        if panoptic:
            from_data = _thing_ids_of(panoptic, detr.NUM_CLASSES)
            if sorted(detr.PANOPTIC_THING_IDS) != from_data:
                raise SetupError(f"{KEY} is {list(detr.PANOPTIC_THING_IDS)} but {', '.join(panoptic)} has the "
                                 f"thing classes {from_data}; remove the key to take them from the data, or fix it")
    _check_range(detr.PANOPTIC_THING_IDS, detr.NUM_CLASSES)
    return detr.PANOPTIC_THING_IDS
