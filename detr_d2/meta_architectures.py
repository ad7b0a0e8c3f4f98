"""detectron2's META_ARCH_REGISTRY builds detr_d2's meta-architectures as fast as
MODEL.DETR.FAST_PATHS asks.

detectron2's ``build_model(cfg)`` -- what ``DefaultPredictor``, ``DefaultTrainer`` and most
scripts call -- builds ``META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)``. The
classes of ``detr_d2.modeling`` register there as any detectron2 meta-architecture does
(``@META_ARCH_REGISTRY.register()``) and stay plain. ``serve_fast_models`` makes the
registry's ``get`` return, for a class that a detr_d2 module defines, a ``FastModelBuilder``
instead of the class (importing this module does it for detectron2's META_ARCH_REGISTRY):
it builds the class from the config and applies
``detr_d2.acceleration.accelerate(model, MODEL.DETR.FAST_PATHS)`` once. Every meta-architecture
detr_d2 registers gets it with no step of its own; other names come out as registered, and
listing the registry still shows the classes.

A config naming 'Detr' with MODEL.DETR.NUM_QUERY_GROUPS != 1 builds 'GroupDetr' (configs
written before GroupDetr existed set only that key).
"""
import importlib

from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

__all__ = ["FastModelBuilder", "configured_meta_architecture", "is_detr_d2_meta_architecture",
           "serve_fast_models"]


def is_detr_d2_meta_architecture(registered):
    """Whether a META_ARCH_REGISTRY entry is an ``nn.Module`` class defined in a detr_d2 module."""
    return (isinstance(registered, type) and issubclass(registered, nn.Module)
            and registered.__module__.startswith("detr_d2."))


def configured_meta_architecture(name, cfg):
    """The meta-architecture name to build for MODEL.META_ARCHITECTURE ``name``: 'Detr' is
    read as 'GroupDetr' when MODEL.DETR.NUM_QUERY_GROUPS asks for query groups."""
    if name == "Detr" and cfg.MODEL.DETR.NUM_QUERY_GROUPS != 1:
        return "GroupDetr"
    return name


def _acceleration():
    """``detr_d2.acceleration``, imported when the first model is built: this module is
    imported while detectron2's modeling package registers, when a module of
    ``detr_d2.modeling`` that ``detr_d2.acceleration`` needs may be half imported."""
    return importlib.import_module("detr_d2.acceleration")


class FastModelBuilder:
    """What ``META_ARCH_REGISTRY.get(name)`` returns for a detr_d2 meta-architecture: called
    with a config, the class's model with ``detr_d2.acceleration`` applied and switched by
    MODEL.DETR.FAST_PATHS (``set_fast_paths(model, False)`` switches it off again)."""

    def __init__(self, name, lookup):
        self.name = name
        self._lookup = lookup

    def __call__(self, cfg):
        meta_architecture = self._lookup(configured_meta_architecture(self.name, cfg))
        return _acceleration().accelerate(meta_architecture(cfg), cfg.MODEL.DETR.FAST_PATHS)

    def __repr__(self):
        return f"FastModelBuilder({self.name!r})"


class _FastModelLookup:
    """``Registry.get`` that answers a detr_d2 meta-architecture with its ``FastModelBuilder``."""

    def __init__(self, plain_lookup):
        self.plain_lookup = plain_lookup

    def __call__(self, name):
        registered = self.plain_lookup(name)
        if is_detr_d2_meta_architecture(registered):
            return FastModelBuilder(name, self.plain_lookup)
        return registered


def serve_fast_models(registry=META_ARCH_REGISTRY):
    """Make ``registry.get`` hand out ``FastModelBuilder``s for detr_d2's meta-architectures
    (idempotent); returns ``registry``."""
    if not isinstance(registry.get, _FastModelLookup):
        registry.get = _FastModelLookup(registry.get)
    return registry


serve_fast_models()
