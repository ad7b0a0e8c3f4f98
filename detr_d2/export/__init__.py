"""Export of a plain DETR (``Detr``, ``GroupDetr``, ``DeformableDetr``, ``Dino``) to ONNX or
TorchScript, verified against eager PyTorch (tools/export_model.py).

* ``adapter.ExportableDetr``: the model's ``predict`` with tensor inputs (padded normalised
  batch, unpadded sizes) and outputs (last-layer logits, normalised cxcywh boxes); the
  padding mask is computed inside the graph;
* ``exporters``: ONNX (dynamo exporter) and TorchScript (trace) writers, and runners of the
  written files (onnxruntime, torch.jit.load);
* ``description``: export.json's content (``detr_d2_deploy.spec.ExportSpec``);
* ``verification``: exported vs eager detections on several sizes and a mixed batch;
* ``support``: configs that cannot be exported, refused with a message;
* ``pipeline.export_model``: all of it, for the tool.

The prepacked oneDNN fast paths cannot be exported: the model is exported with
``set_fast_paths(model, False)`` (the plain computation) and verified against the model as
the tools run it. The torch-free predictor lives in the top-level ``detr_d2_deploy``.
"""
from detr_d2.export.adapter import ExportableDetr
from detr_d2.export.pipeline import ExportRequest, export_model
from detr_d2.export.support import check_exportable

__all__ = ["ExportRequest", "ExportableDetr", "check_exportable", "export_model"]
