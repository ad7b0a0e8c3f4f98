"""The ``ExportSpec`` (export.json) of a config and its class names, and where it came from."""
import torch

from detr_d2.export.exporters import ONNX_OPSET
from detr_d2_deploy.spec import SIGMOID_TOPK, SOFTMAX, ExportSpec

__all__ = ["DEMO_SCORE_THRESHOLD", "export_source", "export_spec"]

DEMO_SCORE_THRESHOLD = 0.5  # tools/demo.py's default --confidence-threshold


def _category_ids(metadata, num_classes):
    """Per contiguous class index, the dataset's category id (None without a mapping)."""
    mapping = metadata.get("thing_dataset_id_to_contiguous_id")
    if not mapping:
        return None
    dataset_id_of = {index: dataset_id for dataset_id, index in mapping.items()}
    return tuple(int(dataset_id_of[index]) for index in range(num_classes))


def export_spec(cfg, metadata, format, topk=None):
    """What export.json says about the model of ``cfg`` exported as ``format``, with the
    class names and ids of ``metadata`` (detectron2 Metadata, possibly without names);
    ``topk``: None for a softmax model, else the k of its sigmoid top-k post-processing."""
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    names = metadata.get("thing_classes")
    return ExportSpec(format=format, channel_order=cfg.INPUT.FORMAT,
                      pixel_mean=tuple(float(v) for v in cfg.MODEL.PIXEL_MEAN),
                      pixel_std=tuple(float(v) for v in cfg.MODEL.PIXEL_STD),
                      shortest_edge=int(cfg.INPUT.MIN_SIZE_TEST), max_size=int(cfg.INPUT.MAX_SIZE_TEST),
                      num_queries=cfg.MODEL.DETR.NUM_OBJECT_QUERIES, num_classes=num_classes,
                      class_names=tuple(names) if names else None,
                      category_ids=_category_ids(metadata, num_classes),
                      score_threshold=DEMO_SCORE_THRESHOLD,
                      mask_threshold=float(cfg.MODEL.MASK_THRESHOLD) if cfg.MODEL.MASK_ON else None,
                      classification=SOFTMAX if topk is None else SIGMOID_TOPK, topk=topk)


def export_source(cfg, config_file, format, example_sizes):
    """export.json's "source": config, weights, meta-architecture, exporter and versions,
    and the image sizes of the example batch the graph was traced on."""
    exporter = (f"torch.onnx.export(dynamo=True), opset {ONNX_OPSET}" if format == "onnx"
                else "torch.jit.trace")
    return {"config_file": str(config_file), "weights": cfg.MODEL.WEIGHTS,
            "meta_architecture": cfg.MODEL.META_ARCHITECTURE, "exporter": exporter,
            "torch": torch.__version__, "example_batch_sizes_hw": [list(size) for size in example_sizes]}
