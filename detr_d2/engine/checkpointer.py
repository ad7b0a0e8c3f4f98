"""A DetectionCheckpointer that never leaves a half-written checkpoint behind.

detectron2's (fvcore's) Checkpointer writes ``model_XXXXXXX.pth`` and ``last_checkpoint``
straight into their final names, so a job killed while saving leaves a truncated file that
``--resume`` then fails to load. Here both are written to a temporary file in the same
folder and moved into place with ``os.replace`` (atomic on POSIX and Windows when source
and target are on the same file system). Checkpoints are local files: OUTPUT_DIR must be
a directory of the local file system.
"""
import os
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer

from detr_d2.checkpoint.io import atomic_write
from detr_d2.engine.checks import SetupError

__all__ = ["AtomicDetectionCheckpointer"]

LAST_CHECKPOINT = "last_checkpoint"



class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and tensor-only loading of ``.pth`` files.

    Saved file: ``{"model": state_dict, <checkpointable>: state_dict, ..., **extra}``, as
    detectron2 writes it (the Trainer's checkpointable holds the iteration, optimizer and
    LR-scheduler state). ``.pth`` files are read with ``torch.load(weights_only=True)``:
    a file that holds arbitrary Python objects is refused with a message naming it.
    """

    def save(self, name, **kwargs):
        """Write ``<save_dir>/<name>.pth`` atomically and point ``last_checkpoint`` at it."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        """Atomically write the name of the newest checkpoint into ``last_checkpoint``."""
        path = os.path.join(self.save_dir, LAST_CHECKPOINT)
        atomic_write(path, lambda f: f.write(last_filename_basename), binary=False)

    def _load_model(self, checkpoint):
        """detectron2's loading, remembering what did not fit in ``self.incompatible``."""
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

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
        """Checkpoint dict with a "model" key; ``.pkl``/``.pyth`` files as detectron2 reads them."""
        if filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)
        try:
            loaded = torch.load(filename, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise SetupError(
                f"{filename} holds Python objects besides tensors, so it is not loaded "
                "(tensor-only loading). If it is a checkpoint of the reference DETR "
                "(facebookresearch/detr), convert it first with tools/convert_detr_checkpoint.py."
            ) from e
        return loaded if "model" in loaded else {"model": loaded}
