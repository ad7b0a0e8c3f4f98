"""Training and evaluation of DETR with detectron2's engine (see ``trainer.Trainer``).

Modules: ``defaults`` (``build_config``, the one way a run or tool builds its config),
``config_merge`` (file and overrides, key checks), ``config_checks`` (values, device,
files), ``datasets`` (dataset names, loading and image-file checks), ``trainer``,
``optimizer``, ``checkpointer``, ``finite_checks`` (NaN/inf stops training),
``one_line_errors`` (errors reported without a traceback), ``writers``, ``build``
(``build_model``: detectron2's, which builds detr_d2's models accelerated).
"""
from detr_d2.engine.build import build_model
from detr_d2.engine.checkpointer import AtomicDetectionCheckpointer
from detr_d2.engine.config_merge import merge_config
from detr_d2.engine.defaults import build_config, share_cpu_cores
from detr_d2.engine.optimizer import build_detr_optimizer, detr_param_groups
from detr_d2.engine.trainer import Trainer, check_training_setup
from detr_d2.errors import NonFiniteValuesError, SetupError

__all__ = [
    "AtomicDetectionCheckpointer",
    "NonFiniteValuesError",
    "SetupError",
    "Trainer",
    "build_config",
    "build_detr_optimizer",
    "build_model",
    "check_training_setup",
    "detr_param_groups",
    "merge_config",
    "share_cpu_cores",
]
