"""The config of a run (defaults, file, command line, datasets, class count, all checked)
and the per-process setup detectron2's ``default_setup`` leaves out."""
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.utils import comm

from detr_d2.config import add_detr_config
from detr_d2.data import register_datasets_from_config, resolve_num_classes
from detr_d2.engine.config_checks import check_model_config
from detr_d2.engine.config_merge import merge_config
from detr_d2.engine.datasets import check_dataset_names
from detr_d2.engine.panoptic_classes import resolve_panoptic_thing_ids

__all__ = ["build_config", "share_cpu_cores"]


def _resolve_dataset_names_and_classes(cfg):
    """Every DATASETS.TRAIN/TEST name must be registered; NUM_CLASSES taken from the data
    when unset, else compared with it."""
    check_dataset_names(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    check_dataset_names(cfg.DATASETS.TEST, "DATASETS.TEST")
    resolve_num_classes(cfg)


def _fill_num_classes(cfg):
    """NUM_CLASSES, when unset, taken from DATASETS.TRAIN (or DATASETS.TEST), whose names
    must then be registered; other dataset names are not checked."""
    if cfg.MODEL.DETR.NUM_CLASSES is not None:
        return
    key = "DATASETS.TRAIN" if cfg.DATASETS.TRAIN else "DATASETS.TEST"
    check_dataset_names(cfg.DATASETS.TRAIN or cfg.DATASETS.TEST, key)
    resolve_num_classes(cfg)


def build_config(config_file, opts, *, all_datasets_registered=True):
    """The frozen config of a run or a tool, every step checked with a message naming the culprit.

    detectron2's defaults + detr_d2's keys (``add_detr_config``), then ``config_file``, then
    the ``KEY VALUE`` list ``opts`` (``merge_config``: unknown keys, wrong types); values
    checked (``check_model_config``); the DATASETS.REGISTER_COCO datasets registered.
    With ``all_datasets_registered`` (training, evaluation), every DATASETS.TRAIN/TEST name
    must be registered and MODEL.DETR.NUM_CLASSES is taken from the data when unset, or
    compared with it. Without (the tools that draw data, run or analyse a model): the names
    may be unregistered (the tools then go without class names) and an explicit
    NUM_CLASSES is kept as it is; an unset one is still taken from the data. Either way the
    model reads MODEL.DETR.NUM_CLASSES from the returned config. With
    MODEL.DETR.PANOPTIC_ON, MODEL.DETR.PANOPTIC_THING_IDS likewise (``panoptic_classes``).

    Raises:
        SetupError (DatasetError for the data).
    """
    cfg = merge_config(add_detr_config(get_cfg()), config_file, opts)
    check_model_config(cfg)
    register_datasets_from_config(cfg)
    if all_datasets_registered:
        _resolve_dataset_names_and_classes(cfg)
    else:
        _fill_num_classes(cfg)
    resolve_panoptic_thing_ids(cfg, compare_with_data=all_datasets_registered)
    cfg.freeze()
    return cfg


def share_cpu_cores(cfg):
    """On CPU with several processes per machine, give each its share of the cores.

    torch starts one thread per core in every process; N training processes on one
    machine then oversubscribe the cores, and OpenMP's waiting threads slow each step
    several-fold (measured on 2 busy cores: 7.9 s per tiny-DETR step with 2 threads, 0.9 s
    with 1). Like ``torchrun``, which sets OMP_NUM_THREADS=1, each process gets
    cores // processes threads, unless OMP_NUM_THREADS is set.
    """
    processes = comm.get_local_size()
    on_cpu = torch.device(cfg.MODEL.DEVICE).type == "cpu"
    if not on_cpu or processes == 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    logging.getLogger("detectron2").info(
        f"{processes} CPU processes on this machine: {threads} torch thread(s) each "
        "(set OMP_NUM_THREADS to choose)")
