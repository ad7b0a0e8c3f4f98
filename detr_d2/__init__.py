"""DETR as a detectron2 plugin. ``import detr_d2`` registers everything it provides.

It imports neither torch nor detectron2 itself (parts such as ``detr_d2.data.shapes``
need neither): it installs the detectron2-version workarounds (``compat``), and the
meta-architectures and backbones are registered the moment detectron2's modeling package
is imported, at once if it already is (``registration``), built by detectron2's
``build_model`` with their acceleration (``meta_architectures``). ``add_detr_config`` and
``modeling`` are imported on first use.
"""
import importlib

from detr_d2 import compat, registration

compat.apply()
registration.register_when_detectron2_loads()

__all__ = ["add_detr_config", "modeling"]


def __getattr__(name):
    """``detr_d2.add_detr_config`` and ``detr_d2.modeling``, imported when first asked for."""
    if name == "add_detr_config":
        return importlib.import_module("detr_d2.config").add_detr_config
    if name == "modeling":
        return importlib.import_module("detr_d2.modeling")
    raise AttributeError(f"module 'detr_d2' has no attribute {name!r}")
