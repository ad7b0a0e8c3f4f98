"""The configs of a backbone pretraining: the DETR config as given, and its trainable copy."""
import torch

from detr_d2.engine import build_config


def pretraining_configs(config_file, opts):
    """(cfg, cfg_train), both frozen: the DETR config of ``engine.build_config`` (the file,
    KEY VALUE ``opts``, NUM_CLASSES from the data when unset) on the CPU, used for naming
    and pixel statistics, and a copy whose backbone trains everything with trainable
    BatchNorm (MODEL.BACKBONE.FREEZE_AT 0 and, for the tiny CNN, MODEL.TINY_CNN.NORM "BN")."""
    cfg = build_config(config_file, [*opts, "MODEL.DEVICE", "cpu"], all_datasets_registered=False)
    cfg_train = cfg.clone()
    cfg_train.defrost()
    cfg_train.MODEL.BACKBONE.FREEZE_AT = 0
    if cfg.MODEL.BACKBONE.NAME == "build_tiny_cnn_backbone":
        cfg_train.MODEL.TINY_CNN.NORM = "BN"
    cfg_train.freeze()
    return cfg, cfg_train


def pixel_mean_std(cfg):
    """MODEL.PIXEL_MEAN and MODEL.PIXEL_STD as [3, 1, 1] tensors."""
    return (torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1),
            torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1))
