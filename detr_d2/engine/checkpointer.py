"""A DetectionCheckpointer that never leaves a half-written checkpoint behind and never
runs code from the files it reads.

detectron2's (fvcore's) Checkpointer writes ``model_XXXXXXX.pth`` and ``last_checkpoint``
straight into their final names, so a job killed while saving leaves a truncated file that
``--resume`` then fails to load. Here both are written to a temporary file in the same
folder and moved into place with ``os.replace`` (atomic on POSIX and Windows when source
and target are on the same file system). Checkpoints are local files: OUTPUT_DIR must be
a directory of the local file system.

Reading: ``.pth`` files with ``torch.load(weights_only=True)``, detectron2 model-zoo
``.pkl`` files with an unpickler that builds NumPy arrays only (see
``detr_d2.checkpoint.io``); ``trust_pickle=True`` (the tools' ``--trust-pickle``) lifts
both limits. Every problem with a file is a SetupError naming the file and the fix.

Layouts: a checkpoint of the reference DETR's detectron2 wrapper, of the reference DETR or of
a transformers DETR is recognised by its keys and read under detr_d2's names
(``detr_d2.checkpoint.layouts``; the log says which layout was read); a checkpoint of none
of these layouts is an error naming them and the closest one.
"""
import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from detr_d2.checkpoint.io import atomic_write, load_checkpoint_file, load_pickle_file
from detr_d2.checkpoint.layouts import DETR_D2, read_layout
from detr_d2.checkpoint.sources import read_weights_file
from detr_d2.engine.finite_checks import non_finite_tensors
from detr_d2.errors import NonFiniteValuesError, SetupError

__all__ = ["AtomicDetectionCheckpointer"]

LAST_CHECKPOINT = "last_checkpoint"
BUFFERS_FROM_CONFIG = ("pixel_mean", "pixel_std")  # detectron2 ignores them when missing
layout_logger = logging.getLogger("detectron2")
CHECKPOINT_HINT = ("Give a checkpoint written by detr_d2/detectron2 (a run's model_*.pth, or the "
                   "output of tools/convert_detr_checkpoint.py) or a detectron2 model-zoo .pkl.")


def model_zoo_checkpoint(data, filename):
    """The checkpoint dict detectron2 makes of an unpickled ``.pkl`` file.

    detectron2 model-zoo files ({"model": ..., "__author__": ...}) are used as they are;
    other dicts are Caffe2/Detectron1 weights (under "blobs" for detection models), to be
    matched to the model by name heuristics, without their "*_momentum" entries.
    """
    if not isinstance(data, Mapping):
        raise SetupError(f"{filename} is not a model checkpoint: it holds a {type(data).__name__}. "
                         f"{CHECKPOINT_HINT}")
    if "model" in data and "__author__" in data:
        return dict(data)
    blobs = data.get("blobs", data)
    weights = {key: value for key, value in blobs.items() if not key.endswith("_momentum")}
    return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}


def check_state_dict(checkpoint, filename):
    """``checkpoint`` must be a dict whose "model" entry (or itself) maps names to tensors."""
    if not isinstance(checkpoint, Mapping):
        raise SetupError(f"{filename} is not a model checkpoint: it holds a "
                         f"{type(checkpoint).__name__}, not a dict of tensors. {CHECKPOINT_HINT}")
    state = checkpoint.get("model", checkpoint)
    where = "its 'model' entry" if "model" in checkpoint else "it"
    if not isinstance(state, Mapping) or not state:
        raise SetupError(f"{filename} is not a model checkpoint: {where} holds no tensors. "
                         f"{CHECKPOINT_HINT}")
    for key, value in state.items():
        if not isinstance(value, (torch.Tensor, np.ndarray)):
            raise SetupError(f"{filename} is not a model checkpoint: {where} holds a "
                             f"{type(value).__name__} under {key!r}, where a tensor is expected. "
                             f"{CHECKPOINT_HINT}")


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and safe, checked loading.

    Saved file: ``{"model": state_dict, <checkpointable>: state_dict, ..., **extra}``, as
    detectron2 writes it (the Trainer's checkpointable holds the iteration, optimizer and
    LR-scheduler state). A model with NaN/inf weights is not saved (NonFiniteValuesError),
    so ``last_checkpoint`` always names weights that can be trained on.

    Args:
        trust_pickle (bool): read files with full unpickling (runs code from the file);
            only for files whose origin the user trusts.
        other arguments: as ``DetectionCheckpointer``.
    """

    def __init__(self, model, save_dir="", *, trust_pickle=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.trust_pickle = trust_pickle
        self.incompatible = None
        self._loading = None  # the file being loaded, for messages

    def save(self, name, **kwargs):
        """Write ``<save_dir>/<name>.pth`` atomically and point ``last_checkpoint`` at it."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self._refuse_non_finite(data["model"], save_file)
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(os.path.basename(save_file))

    def _refuse_non_finite(self, state_dict, save_file):
        """Raise NonFiniteValuesError if a weight of ``state_dict`` is NaN or infinite."""
        bad = non_finite_tensors(state_dict)
        if bad:
            kept = self.get_checkpoint_file() if self.has_checkpoint() else "none was written"
            raise NonFiniteValuesError(
                f"not saving {save_file}: {len(bad)} model tensor(s) hold NaN/inf values "
                f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); the last checkpoint "
                f"({kept}) is kept. Training diverged: lower SOLVER.BASE_LR or enable "
                "SOLVER.CLIP_GRADIENTS, then resume or restart.")

    def tag_last_checkpoint(self, last_filename_basename):
        """Atomically write the name of the newest checkpoint into ``last_checkpoint``."""
        path = os.path.join(self.save_dir, LAST_CHECKPOINT)
        atomic_write(path, lambda f: f.write(last_filename_basename), binary=False)

    def _load_model(self, checkpoint):
        """detectron2's loading, remembering what did not fit in ``self.incompatible``.

        detectron2 logs the tensors that were skipped (missing, unexpected, other shape);
        a checkpoint of which no tensor fits at all is an error (SetupError).
        """
        self.incompatible = super()._load_model(checkpoint)
        model_keys = set(self.model.state_dict()) - set(BUFFERS_FROM_CONFIG)
        if model_keys and model_keys <= set(self.incompatible.missing_keys):
            raise SetupError(
                f"{self._loading} holds no tensor of this model ({len(model_keys)} tensors, none found "
                "in the checkpoint with the model's name and shape): it is a checkpoint of another "
                "model. Use the config it was trained with, or leave MODEL.WEIGHTS empty to train "
                "from scratch.")
        return self.incompatible

    def load(self, path, checkpointables=None):
        """detectron2's ``load`` (see ``_load_file`` for what is accepted)."""
        self._loading = path
        return super().load(path, checkpointables=checkpointables)

    def load_for_inference(self, path):
        """Load ``path`` and require every model tensor from it, with the model's shape.

        Evaluating or drawing with a model whose tensors partly kept their random
        initialisation gives garbage, so any missing or mis-shaped tensor is an error
        (training from partial weights stays possible through ``load``/``resume_or_load``).
        """
        self.incompatible = None
        self.load(path)
        missing = sorted(self.incompatible.missing_keys) if self.incompatible else []
        if missing:
            shapes = {key: (ckpt, model) for key, ckpt, model in self.incompatible.incorrect_shapes}
            listed = [f"{k} (checkpoint {tuple(shapes[k][0])}, model {tuple(shapes[k][1])})" if k in shapes else k
                      for k in missing]
            raise SetupError(
                f"{path} does not fit the model of this config: {len(missing)} tensor(s) missing or of "
                f"another shape: {', '.join(listed[:8])}{' ...' if len(listed) > 8 else ''}. Use the config "
                "the checkpoint was trained with (its run's config.yaml) or the matching *_dc5/r101 config.")

    def _load_file(self, filename):
        """Checkpoint dict with a "model" entry of tensors or arrays; SetupError (CheckpointError
        for a file that is no readable checkpoint) if unusable.

        ``.pth``: tensor-only ``torch.load``; ``.pkl``: NumPy-only unpickling, then
        detectron2's model-zoo conventions; ``.safetensors``: the safetensors library;
        ``.pyth`` (pycls): as detectron2 reads it.
        """
        if filename.endswith(".pyth"):
            return super()._load_file(filename)
        if filename.endswith(".pkl"):
            loaded = model_zoo_checkpoint(load_pickle_file(filename, self.trust_pickle), filename)
        elif filename.endswith(".safetensors"):  # e.g. a transformers model.safetensors
            loaded = read_weights_file(filename)
        else:
            loaded = load_checkpoint_file(filename, self.trust_pickle, allowed_globals=())
        check_state_dict(loaded, filename)
        checkpoint = loaded if "model" in loaded else {"model": loaded}
        if checkpoint.get("matching_heuristics"):  # detectron2 model-zoo / Caffe2 files: matched by name
            return checkpoint
        return self._in_detr_d2_layout(checkpoint, filename)

    def _in_detr_d2_layout(self, checkpoint, filename):
        """``checkpoint`` with its model tensors under detr_d2's names (``read_layout``); the
        training state of another code base's trainer (optimizer, scheduler, iteration) is
        left out, as it does not fit this model's parameters. Logs the layout read."""
        state = {key: torch.as_tensor(value) if isinstance(value, np.ndarray) else value
                 for key, value in checkpoint["model"].items()}
        reading = read_layout(state, filename, model_keys=self.model.state_dict().keys())
        if reading.layout is DETR_D2:
            layout_logger.info(f"Reading {filename}: detr_d2 layout")
            return checkpoint
        notes = "".join(f"; {note}" for note in reading.notes)
        layout_logger.info(f"Reading {filename}: checkpoint layout of {reading.layout.title}, "
                           f"{len(reading.state_dict)} tensors mapped to detr_d2's names{notes}")
        others = sorted(key for key in checkpoint if key != "model")
        if others:
            layout_logger.info(f"{filename}: its {', '.join(others)} entries are not restored (they belong to "
                               f"the model layout of {reading.layout.title})")
        return {"model": reading.state_dict, "__author__": f"{reading.layout.name} layout, read by detr_d2"}
