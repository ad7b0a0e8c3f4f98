"""The configs of a backbone pretraining: the DETR config as given, and its trainable copy."""
import torch
from detectron2.config import get_cfg

from detr_d2 import add_detr_config
from detr_d2.data import register_datasets_from_config, resolve_num_classes
from detr_d2.engine import merge_config
from detr_d2.modeling.tiny_backbone import add_tiny_cnn_config


def _fill_num_classes(cfg):
    """Set an unset MODEL.DETR.NUM_CLASSES from the config's datasets, as training does:
    the Detr model that names the backbone keys needs a class count."""
    if cfg.MODEL.DETR.NUM_CLASSES is None:
        register_datasets_from_config(cfg)
        resolve_num_classes(cfg)


def pretraining_configs(config_file, opts):
    """(cfg, cfg_train): the DETR config (detr_d2 + tiny CNN keys, the file, KEY VALUE
    ``opts``, NUM_CLASSES from the data when unset) on the CPU, used for naming and pixel
    statistics, and a copy whose backbone trains everything with trainable BatchNorm
    (MODEL.BACKBONE.FREEZE_AT 0 and, for the tiny CNN, MODEL.TINY_CNN.NORM "BN")."""
    cfg = get_cfg()
    add_detr_config(cfg)
    add_tiny_cnn_config(cfg)
    merge_config(cfg, config_file, opts)
    _fill_num_classes(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg_train = cfg.clone()
    cfg_train.MODEL.BACKBONE.FREEZE_AT = 0
    if cfg.MODEL.BACKBONE.NAME == "build_tiny_cnn_backbone":
        cfg_train.MODEL.TINY_CNN.NORM = "BN"
    return cfg, cfg_train


def pixel_mean_std(cfg):
    """MODEL.PIXEL_MEAN and MODEL.PIXEL_STD as [3, 1, 1] tensors."""
    return (torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1),
            torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1))
