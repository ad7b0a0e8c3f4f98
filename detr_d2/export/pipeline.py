"""What tools/export_model.py does: export a loaded model, verify it, describe it."""
import itertools
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from detr_d2.acceleration import set_fast_paths
from detr_d2.export.adapter import ExportableDetr, coarsest_stride, is_sigmoid_topk
from detr_d2.export.description import export_source, export_spec
from detr_d2.export.exporters import EXPORTERS, load_exported, min_traced_side
from detr_d2.export.verification import (
    compare,
    example_batch,
    report_lines,
    verification_images,
    verification_sizes,
)
from detr_d2_deploy.files import atomic_write
from detr_d2_deploy.spec import EXPORT_FILE

__all__ = ["ExportRequest", "export_model"]

logger = logging.getLogger("detectron2")

# torch.export takes a dimension of size 1 in the example as the constant 1: with 2 images
# the exported batch stays dynamic.
MIN_EXAMPLE_BATCH = 2


@dataclass
class ExportRequest:
    """What to export and how: ``format`` ("onnx" | "torchscript"), ``output_dir``,
    ``sample_image`` (HWC uint8 in INPUT.FORMAT, or None for random images), ``verify``,
    ``batch_size`` (images in the verification's mixed-size batch and in the example batch
    the graph is traced on, which has at least ``MIN_EXAMPLE_BATCH``)."""

    format: str
    output_dir: str
    sample_image: Optional[np.ndarray] = None
    verify: bool = False
    batch_size: int = 2


def _mixed_sizes(sizes, batch_size):
    """``batch_size`` sizes taken in turn from ``sizes`` (so consecutive images differ)."""
    return list(itertools.islice(itertools.cycle(sizes), batch_size))


def _verify(model, spec, model_path, request, sizes):
    """The ``Difference`` of each single-image batch of ``sizes`` and of the mixed batch."""
    run_exported = load_exported(request.format, model_path)
    differences = [compare(f"{h}x{w}", model, run_exported, verification_images([(h, w)], request.sample_image),
                           spec) for h, w in sizes]
    mixed = verification_images(_mixed_sizes(sizes, request.batch_size), request.sample_image)
    differences.append(compare(f"batch of {len(mixed)}", model, run_exported, mixed, spec))
    return differences


def _write_model_file(model, cfg, spec, request, example_images):
    """Export the plain computation of ``model`` (its fast paths off meanwhile), traced on
    ``example_images``; the path of the written file."""
    path = os.path.join(request.output_dir, spec.model_file)
    logger.info(f"Exporting to {path} ({request.format}), traced on a batch of "
                f"{', '.join(f'{h}x{w}' for h, w in (i.shape[:2] for i in example_images))}")
    set_fast_paths(model, False)
    try:
        EXPORTERS[request.format](ExportableDetr(model).eval(), *example_batch(example_images, spec), path)
    finally:
        set_fast_paths(model, cfg.MODEL.DETR.FAST_PATHS)
    return path


def _verification(model, spec, model_path, request, sizes):
    """Run and log the verification; export.json's "verification" entry."""
    differences = _verify(model, spec, model_path, request, sizes)
    for line in report_lines(differences, request.format):
        logger.info(line)
    return {"passed": all(d.within_tolerance for d in differences), "batches": [d.to_json() for d in differences]}


def export_model(model, cfg, config_file, metadata, request):
    """Export ``model`` (built from ``cfg`` by ``detr_d2.engine.build_model``, weights
    loaded, eval mode, on the CPU) into ``request.output_dir``: the model file and
    export.json (both written atomically). Returns (the export.json object, whether the
    verification passed, True without ``request.verify``)."""
    spec = export_spec(cfg, metadata, request.format, model.topk if is_sigmoid_topk(model) else None)
    sizes = verification_sizes(spec.shortest_edge, min_traced_side(coarsest_stride(model)))
    example_images = verification_images(_mixed_sizes(sizes, max(request.batch_size, MIN_EXAMPLE_BATCH)),
                                         request.sample_image)
    model_path = _write_model_file(model, cfg, spec, request, example_images)
    extra = {"source": export_source(cfg, config_file, request.format, [i.shape[:2] for i in example_images])}
    if request.verify:
        extra["verification"] = _verification(model, spec, model_path, request, sizes)
    description = spec.to_json(**extra)
    atomic_write(os.path.join(request.output_dir, EXPORT_FILE),
                 lambda file: json.dump(description, file, indent=1), binary=False)
    return description, extra.get("verification", {"passed": True})["passed"]
