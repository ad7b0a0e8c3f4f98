"""Training and evaluation of DETR with detectron2's engine (see ``trainer.Trainer``)."""
from detr_d2.engine.checkpointer import AtomicDetectionCheckpointer
from detr_d2.engine.checks import SetupError, merge_config
from detr_d2.engine.defaults import build_config, share_cpu_cores
from detr_d2.engine.failures import NonFiniteValuesError
from detr_d2.engine.optimizer import build_detr_optimizer, detr_param_groups
from detr_d2.engine.trainer import Trainer, check_training_setup

__all__ = [
    "AtomicDetectionCheckpointer",
    "NonFiniteValuesError",
    "SetupError",
    "Trainer",
    "build_config",
    "build_detr_optimizer",
    "check_training_setup",
    "detr_param_groups",
    "merge_config",
    "share_cpu_cores",
]
