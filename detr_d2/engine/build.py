"""The model of a config as training, evaluation and the tools run it."""
from detectron2.modeling import build_model as build_plain_model

from detr_d2.acceleration import accelerate

__all__ = ["build_model"]


def _meta_architecture(cfg):
    """MODEL.META_ARCHITECTURE, with 'Detr' read as 'GroupDetr' when MODEL.DETR.NUM_QUERY_GROUPS
    asks for query groups (configs written before GroupDetr existed set only that key)."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name == "Detr" and cfg.MODEL.DETR.NUM_QUERY_GROUPS != 1:
        return "GroupDetr"
    return name


def build_model(cfg):
    """detectron2's ``build_model(cfg)`` (the plain model of ``detr_d2.modeling``), with
    ``detr_d2.acceleration`` applied and switched by MODEL.DETR.FAST_PATHS."""
    meta_architecture = _meta_architecture(cfg)
    if meta_architecture != cfg.MODEL.META_ARCHITECTURE:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.META_ARCHITECTURE = meta_architecture
    return accelerate(build_plain_model(cfg), cfg.MODEL.DETR.FAST_PATHS)
