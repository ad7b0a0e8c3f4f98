"""When ``import detr_d2`` registers detr_d2 in detectron2's registries.

Registering needs detectron2's modeling package (its registries), which imports torch;
``import detr_d2`` itself does not, because importing any part of detr_d2 runs it, and
some parts need neither torch nor detectron2 (``detr_d2.data.shapes``, the shapes
generator's whole import). So ``register_with_detectron2`` runs right after detectron2's
modeling package has been imported, or at once if it already is: before anything can
look a name up in META_ARCH_REGISTRY or BACKBONE_REGISTRY. It imports ``detr_d2.modeling``
(whose classes register themselves) and ``detr_d2.meta_architectures`` (which makes
META_ARCH_REGISTRY build them accelerated). Both register by being imported, so a
registration that starts while one of them is still importing completes when it has.
"""
import importlib.abc
import importlib.util
import sys

__all__ = ["register_when_detectron2_loads", "register_with_detectron2"]

DETECTRON2_MODELING = "detectron2.modeling"


def register_with_detectron2():
    """Register detr_d2's meta-architectures and backbones in detectron2 (idempotent).

    The imports are here, not at the top: this module is imported with ``detr_d2``,
    before torch and detectron2 are.
    """
    import detr_d2.meta_architectures  # noqa: F401  (META_ARCH_REGISTRY builds them accelerated)
    import detr_d2.modeling  # noqa: F401  (its classes register in detectron2's registries)


class _RunAfterImport(importlib.abc.MetaPathFinder):
    """Finds no module itself: when ``module_name`` is first imported, it makes the import
    system's own loader of it call ``function`` right after the module has run."""

    def __init__(self, module_name, function):
        self.module_name = module_name
        self.function = function

    def find_spec(self, name, path=None, target=None):
        if name != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_call(module):
            execute(module)
            self.function()

        spec.loader.exec_module = execute_then_call
        return spec


def register_when_detectron2_loads():
    """``register_with_detectron2`` now if detectron2's modeling package is imported, else
    right after it is (once)."""
    if DETECTRON2_MODELING in sys.modules:
        register_with_detectron2()
    elif not any(isinstance(finder, _RunAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RunAfterImport(DETECTRON2_MODELING, register_with_detectron2))
