"""``Trainer``: detectron2's DefaultTrainer set up for DETR.

Differences from DefaultTrainer:
- optimizer: ``build_detr_optimizer`` (AdamW/SGD, backbone LR multiplier, full-model
  gradient clipping); LR schedule: detectron2's ``build_lr_scheduler`` (WarmupMultiStepLR);
- data: ``DetrDatasetMapper`` for training and test loaders; datasets are checked when
  loaded (readable annotation files, existing images, see ``datasets``; their names were
  checked by ``build_config``);
- DistributedDataParallel is built with ``compat.ddp_device_ids`` so that multi-process
  training also runs on CPU (gloo);
- checkpoints are written atomically (``AtomicDetectionCheckpointer``) and hold the
  optimizer (and AMP grad-scaler) state besides the iteration and LR scheduler; they are
  read without running code from the file unless ``trust_pickle``; temporary files left
  by a killed run are removed when resuming;
- NaN/inf predictions, losses or weights stop training with a message naming the
  iteration and the loss terms; the last checkpoint stays the last good one
  (``finite_checks``), and detectron2's training loop logs them, and setup errors, as one
  line (``one_line_errors``);
- evaluation: each test set by the evaluator of its ``evaluator_type`` (coco, lvis,
  pascal_voc; ``detr_d2.evaluation.detection_evaluator``) into ``OUTPUT_DIR/inference``,
  and with TEST.EVAL_LOSSES DETR's criterion on it from the same forward pass
  (``test``: results "val" -> val/<name> scalars);
- console: every loss, ``class_error`` and ``cardinality_error`` (``MetricPrinter``);
- mixed precision on the CPU and CUDA: SOLVER.AMP.ENABLED trains with ``DetrAMPTrainer``
  (``amp_trainer``), TEST.AMP.ENABLED evaluates under autocast (``precision``).
"""
import itertools
import logging
import os
import weakref

from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.build import (
    filter_images_with_only_crowd_annotations,
    print_instances_class_histogram,
)
from detectron2.engine import DefaultTrainer
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import DatasetEvaluators
from detectron2.solver import build_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.events import JSONWriter, TensorboardXWriter
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from detr_d2 import compat
from detr_d2.checkpoint.io import remove_stale_temporary_files
from detr_d2.data import DetrDatasetMapper, pack_batch
from detr_d2.engine.build import build_model
from detr_d2.engine.checkpointer import AtomicDetectionCheckpointer
from detr_d2.engine.config_checks import check_amp, check_device, check_weights_to_load
from detr_d2.engine.datasets import load_dataset_dicts
from detr_d2.engine.frozen_detector import load_frozen_detector
from detr_d2.engine.amp_trainer import DetrAMPTrainer
from detr_d2.engine.finite_checks import DetrSimpleTrainer, install_output_check
from detr_d2.engine.one_line_errors import install_one_line_errors
from detr_d2.engine.optimizer import build_detr_optimizer
from detr_d2.engine.precision import inference_autocast, training_dtype
from detr_d2.engine.writers import MetricPrinter
from detr_d2.errors import NonFiniteValuesError, SetupError
from detr_d2.evaluation import (
    ValidationLossEvaluator,
    WithValidationLosses,
    check_evaluator_types,
    detection_evaluator,
)

__all__ = ["Trainer", "check_training_setup"]

logger = logging.getLogger("detectron2")


def check_training_setup(cfg):
    """Everything about ``cfg`` (from ``build_config``) that can be checked cheaply before
    training starts: device, AMP, a DATASETS.TRAIN that is not empty.

    The dataset names were checked by ``build_config``; the datasets' files are checked
    when they are loaded (the training set while the Trainer is built, the test sets then
    too, see ``Trainer.__init__``).
    """
    check_device(cfg)
    check_amp(cfg)
    if not cfg.DATASETS.TRAIN:
        raise SetupError("DATASETS.TRAIN is empty; name the registered dataset(s) to train on.")


def wrap_ddp(model, device):
    """``model`` in DistributedDataParallel when there is more than one process.

    ``device_ids`` is the local GPU on CUDA and None on CPU (detectron2 v0.6's
    ``create_ddp_model`` always passes a GPU index, which torch rejects on CPU).
    """
    if comm.get_world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=compat.ddp_device_ids(device),
                                   broadcast_buffers=False)


def training_dataset_dicts(names, filter_empty):
    """The records of the training datasets ``names``, concatenated.

    Like detectron2's ``get_detection_dataset_dicts`` (without proposals/keypoints), but
    each dataset is read through ``load_dataset_dicts`` so a broken dataset is named.
    With ``filter_empty``, images without any non-crowd annotation are dropped.
    """
    dicts = list(itertools.chain.from_iterable(load_dataset_dicts(name) for name in names))
    has_instances = "annotations" in dicts[0]
    if filter_empty and has_instances:
        dicts = filter_images_with_only_crowd_annotations(dicts)
        if not dicts:
            raise SetupError(f"No image of {', '.join(names)} has an annotation; set "
                             "DATALOADER.FILTER_EMPTY_ANNOTATIONS False to train on them anyway.")
    class_names = MetadataCatalog.get(names[0]).get("thing_classes", None)
    if has_instances and class_names:
        print_instances_class_histogram(dicts, class_names)
    return dicts


class Trainer(DefaultTrainer):
    """DefaultTrainer for DETR; use it like DefaultTrainer (see module doc).

    Example::

        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    """

    def __init__(self, cfg, trust_pickle=False):
        """Build data, model, optimizer, LR scheduler, checkpointer and hooks from ``cfg``
        (a config of ``build_config``: dataset names checked, MODEL.DETR.NUM_CLASSES set).

        ``trust_pickle``: read MODEL.WEIGHTS / resumed checkpoints with full unpickling,
        which runs code from the file (the ``--trust-pickle`` flag of tools/train_net.py).

        Sets the attributes DefaultTrainer sets (``_trainer`` holding model, data_loader and
        optimizer; scheduler, checkpointer, start_iter, max_iter, cfg) without calling
        ``DefaultTrainer.__init__``, whose DDP wrapper does not work on CPU in v0.6.
        Data is loaded first, so that a broken dataset is reported before the model is built.
        """
        TrainerBase.__init__(self)
        if not logger.isEnabledFor(logging.INFO):  # setup_logger was not called for detectron2
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        check_training_setup(cfg)
        check_evaluator_types(cfg.DATASETS.TEST, cfg=cfg)  # fail now rather than at the first evaluation
        for name in cfg.DATASETS.TEST:
            load_dataset_dicts(name)
        data_loader = self.build_train_loader(cfg)
        model = self.build_model(cfg)
        install_output_check(model)
        install_one_line_errors()
        optimizer = self.build_optimizer(cfg, model)
        model = wrap_ddp(model, cfg.MODEL.DEVICE)
        self._trainer = self.build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(model, cfg.OUTPUT_DIR, trust_pickle=trust_pickle,
                                                        trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @staticmethod
    def build_step_trainer(cfg, model, data_loader, optimizer):
        """The loop's step: ``DetrSimpleTrainer`` (float32), or with SOLVER.AMP.ENABLED a
        ``DetrAMPTrainer`` autocasting to SOLVER.AMP.PRECISION's dtype on MODEL.DEVICE."""
        dtype = training_dtype(cfg)
        if dtype is None:
            return DetrSimpleTrainer(model, data_loader, optimizer)
        return DetrAMPTrainer(model, data_loader, optimizer, cfg.MODEL.DEVICE, dtype)

    def resume_or_load(self, resume=True):
        """Resume from OUTPUT_DIR's last checkpoint, or load MODEL.WEIGHTS (checked to exist).

        When resuming, the temporary files of checkpoints a killed run did not finish are
        deleted first (the checkpoints they were to become were never in place).
        """
        check_weights_to_load(self.cfg, resume)
        if resume and comm.is_main_process():
            removed = remove_stale_temporary_files(self.cfg.OUTPUT_DIR)
            if removed:
                logger.warning(f"Removed {len(removed)} unfinished checkpoint file(s) of an interrupted "
                               f"run from {self.cfg.OUTPUT_DIR}: {', '.join(removed)}")
        super().resume_or_load(resume=resume)

    def train(self):
        """Train from ``start_iter`` to ``max_iter`` (see DefaultTrainer.train).

        Raises:
            NonFiniteValuesError: NaN/inf predictions, losses or weights; the message names
                the iteration and the terms, and which checkpoint to restart from.
        """
        try:
            return super().train()
        except NonFiniteValuesError as error:
            raise NonFiniteValuesError(f"{error}. {self._restart_hint()}") from None

    def _restart_hint(self):
        """Which checkpoint is intact, and how to go on from it."""
        if not self.checkpointer.has_checkpoint():
            return ("Training stopped; no checkpoint had been written. Lower SOLVER.BASE_LR or enable "
                    "SOLVER.CLIP_GRADIENTS, or check the data.")
        last = self.checkpointer.get_checkpoint_file()
        return (f"Training stopped. The last checkpoint, {last}, is intact (written before the failure). "
                "To go on with other settings (e.g. a lower SOLVER.BASE_LR, or SOLVER.CLIP_GRADIENTS."
                f"ENABLED True), start a new run with MODEL.WEIGHTS {last} (--resume restores the optimizer "
                "and LR schedule saved in it).")

    def state_dict(self):
        """Iteration, hook states (LR scheduler) and, under "_trainer", the optimizer state.

        detectron2 v0.6's DefaultTrainer leaves the optimizer out of its checkpoints, so a
        resumed AdamW would restart without its moments; later versions save it the same way.
        """
        state = super().state_dict()
        state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        """Restore what ``state_dict`` saved (iteration, LR scheduler, optimizer)."""
        super().load_state_dict(state_dict)
        self._trainer.load_state_dict(state_dict["_trainer"])

    def build_writers(self):
        """Console (every loss and error metric), metrics.json and TensorBoard writers."""
        return [
            MetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    @classmethod
    def build_model(cls, cfg):
        """The config's model with its acceleration (``detr_d2.engine.build_model``); with
        MODEL.DETR.FROZEN_WEIGHTS, that detector loaded and frozen (``load_frozen_detector``)."""
        model = build_model(cfg)
        logger.info(f"Model:\n{model}")
        if cfg.MODEL.DETR.FROZEN_WEIGHTS:
            load_frozen_detector(model, cfg.MODEL.DETR.FROZEN_WEIGHTS)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        """AdamW/SGD with the backbone LR multiplier and clipping (``build_detr_optimizer``)."""
        return build_detr_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """detectron2's scheduler of SOLVER.LR_SCHEDULER_NAME (WarmupMultiStepLR: step drops)."""
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        """Batches (lists of ``DetrDatasetMapper`` outputs) of DATASETS.TRAIN, endlessly.
        Without aspect-ratio grouping the workers collate whole batches, and ``pack_batch``
        makes each batch cross to this process as a few shared storages."""
        dicts = training_dataset_dicts(cfg.DATASETS.TRAIN, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        packs_in_workers = cfg.DATALOADER.NUM_WORKERS > 0 and not cfg.DATALOADER.ASPECT_RATIO_GROUPING
        return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, True), dataset=dicts,
                                            collate_fn=pack_batch if packs_in_workers else None)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Batches of one ``DetrDatasetMapper`` (test mode) output of ``dataset_name``; with
        TEST.EVAL_LOSSES the inputs keep their ground truth as "instances"."""
        mapper = DetrDatasetMapper(cfg, False, with_instances=cfg.TEST.EVAL_LOSSES)
        return build_detection_test_loader(load_dataset_dicts(dataset_name), mapper=mapper,
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        """The evaluator of ``dataset_name``'s ``evaluator_type`` (``detection_evaluator``);
        results and predictions in OUTPUT_DIR/inference."""
        return detection_evaluator(cfg, dataset_name, os.path.join(cfg.OUTPUT_DIR, "inference"))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on every DATASETS.TEST set (DefaultTrainer.test).

        With TEST.EVAL_LOSSES (and no ``evaluators`` given), each set's evaluator is joined
        by a ``ValidationLossEvaluator`` and the model runs as ``WithValidationLosses``: one
        forward pass per batch gives the detections and DETR's criterion. Each set's results
        then also hold "val": {"loss", "loss_ce", ..., "loss_ce_unscaled", "class_error", ...},
        stored by the EvalHook as ``val/<name>`` (``<dataset>/val/<name>`` with several sets).
        With TEST.AMP.ENABLED the model runs under autocast (``precision.inference_autocast``).
        """
        with inference_autocast(cfg):
            return cls._test(cfg, model, evaluators)

    @classmethod
    def _test(cls, cfg, model, evaluators):
        if not cfg.TEST.EVAL_LOSSES or evaluators is not None:
            return super().test(cfg, model, evaluators)
        with_losses = WithValidationLosses(model)
        weights = with_losses.model.criterion.weight_dict
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluators = [DatasetEvaluators([cls.build_evaluator(cfg, name),
                                         ValidationLossEvaluator(name, weights, output_dir)])
                      for name in cfg.DATASETS.TEST]
        return super().test(cfg, with_losses, evaluators)
