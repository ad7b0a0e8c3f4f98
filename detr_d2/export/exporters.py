"""Writing ``ExportableDetr`` as ONNX or TorchScript, and running what was written.

ONNX: torch's dynamo exporter (``torch.onnx.export(dynamo=True)``, opset 18, weights inside
the one file), with the batch, height and width dynamic. TorchScript: ``torch.jit.trace``
(shapes are traced as operations, so other sizes and batch sizes run the same graph).
Both take ``(images float32 [B, 3, H, W], image_sizes int64 [B, 2])`` and return
``(logits [B, Q, K+1] or [B, Q, K], boxes [B, Q, 4])`` (and mask logits with
MODEL.MASK_ON), see ``ExportableDetr``.
"""
import contextlib
import logging
import warnings

import onnx
import torch
from onnx_ir.passes import Sequential
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    DeduplicateInitializersPass,
    LiftConstantsToInitializersPass,
    NameFixPass,
    OutputFixPass,
    RemoveUnusedNodesPass,
)
from onnxscript.optimizer import fold_constants
from torch.export import Dim

from detr_d2.errors import SetupError
from detr_d2_deploy.errors import DeployError
from detr_d2_deploy.files import written_atomically
from detr_d2_deploy.predictor import onnx_session
from detr_d2_deploy.spec import BOXES, IMAGE_SIZES, IMAGES, LOGITS, MASKS

__all__ = ["EXPORTERS", "ONNX_OPSET", "ExportError", "export_onnx", "export_torchscript", "load_exported"]

ONNX_OPSET = 18


class ExportError(SetupError):
    """The model cannot be exported as asked; the message says what and why."""


def min_traced_side(stride):
    """The smallest image side the exported graph is traced for: torch.export takes a
    size-1 dimension as the constant 1, so sides above the coarsest feature map's
    ``stride`` (``adapter.coarsest_stride``) keep that map at 2 cells or more."""
    return stride + 1


def _dynamic_shapes(stride):
    """Batch, height and width dynamic; sides of at least ``min_traced_side(stride)`` (the
    exported graph itself does not check sizes)."""
    batch = Dim("batch", min=1)
    height, width = Dim("height", min=min_traced_side(stride)), Dim("width", min=min_traced_side(stride))
    return {IMAGES: {0: batch, 2: height, 3: width}, IMAGE_SIZES: {0: batch}}


@contextlib.contextmanager
def _quiet_exporter():
    """Without the exporter's warnings (axis names) and onnxscript's notes on the ops it
    does not constant-fold."""
    optimizer_log = logging.getLogger("onnxscript")
    level = optimizer_log.level
    optimizer_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optimizer_log.setLevel(level)


def _check_dynamic_axes(path):
    """ExportError unless the batch, height and width of the ONNX file's images are symbolic
    (the exporter falls back to fixed sizes when the model turns them into Python ints)."""
    images = next(i for i in onnx.load(path).graph.input if i.name == IMAGES)
    fixed = [f"{name} = {dim.dim_value}" for name, dim in zip(("batch", None, "height", "width"),
                                                                images.type.tensor_type.shape.dim)
             if name and not dim.dim_param]
    if fixed:
        raise ExportError(f"the ONNX export fixed {', '.join(fixed)} of its images input: the model turns a "
                          "tensor size into a Python int (e.g. len(tensor), int(size)); use tensor.shape[i]")


def _optimize(program):
    """The exported ``program``'s graph optimised as the exporter's default (onnxscript's
    ``optimize``) does, but without its pattern rewrites: constants folded, unused nodes
    removed, constants lifted to initializers, duplicates merged. onnxruntime does its own
    fusions when it loads the file. The rewrites of onnxscript 0.7 name the initializers
    they create after the rewritten tensor, so two rewrites of one tensor share a name and
    leave a node reading a missing input, which onnxruntime refuses (``inverse_sigmoid``:
    ``Max``/``Min`` -> ``Clip``, then ``Clip(Clip(x))`` -> ``Clip``)."""
    fold_constants(program.model)
    Sequential(RemoveUnusedNodesPass(), LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
               DeduplicateInitializersPass(), CommonSubexpressionEliminationPass(), RemoveUnusedNodesPass(),
               OutputFixPass(), NameFixPass())(program.model)


def export_onnx(adapter, images, image_sizes, path):
    """Write ``adapter`` to the ONNX file ``path`` (atomically), traced on the example batch
    ``images`` / ``image_sizes`` (torch tensors; at least 2 images, so that the batch stays
    dynamic; sides of at least ``min_traced_side(adapter.coarsest_stride)``)."""
    output_names = [LOGITS, BOXES, MASKS] if adapter.has_masks else [LOGITS, BOXES]
    dynamic_shapes = _dynamic_shapes(adapter.coarsest_stride)
    with written_atomically(path) as temporary:
        with _quiet_exporter():
            program = torch.onnx.export(adapter, (images, image_sizes), input_names=[IMAGES, IMAGE_SIZES],
                                        output_names=output_names, dynamic_shapes=dynamic_shapes, dynamo=True,
                                        opset_version=ONNX_OPSET, optimize=False, verbose=False)
            _optimize(program)
            program.save(temporary, external_data=False)
        _check_dynamic_axes(temporary)


def export_torchscript(adapter, images, image_sizes, path):
    """Write ``adapter`` traced by ``torch.jit.trace`` on the example batch to ``path``
    (atomically)."""
    with written_atomically(path) as temporary, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # trace warnings on Python values that do not depend on the input
        torch.jit.save(torch.jit.trace(adapter, (images, image_sizes)), temporary)


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}


class _TorchScriptRunner:
    def __init__(self, path):
        try:
            self.module = torch.jit.load(path, map_location="cpu")
        except RuntimeError as error:
            raise SetupError(f"torch.jit.load cannot read {path}: {error}") from error

    def __call__(self, images, image_sizes):
        with torch.no_grad():
            outputs = self.module(torch.from_numpy(images), torch.from_numpy(image_sizes))
        return [output.numpy() for output in outputs]


class _OnnxRunner:
    def __init__(self, path):
        try:
            self.session = onnx_session(path)
        except DeployError as error:
            raise SetupError(str(error)) from error

    def __call__(self, images, image_sizes):
        return self.session.run(None, {IMAGES: images, IMAGE_SIZES: image_sizes})


def load_exported(format, path):
    """The exported model at ``path`` (onnxruntime for "onnx", torch.jit.load for
    "torchscript") as a function (images float32 [B, 3, H, W], image_sizes int64 [B, 2],
    numpy) -> [logits [B, Q, K+1] or [B, Q, K], boxes [B, Q, 4]] (+ mask logits
    [B, Q, h2, w2] with a mask head) numpy."""
    return _OnnxRunner(path) if format == "onnx" else _TorchScriptRunner(path)
