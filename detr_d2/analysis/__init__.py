"""Looking inside a trained DETR: ``attention_maps`` records what the last decoder layer's
queries and the last encoder layer attend to (tools/visualize_attention.py draws it)."""
from detr_d2.analysis.attention_maps import (
    AttentionRecording,
    ImageAttention,
    detections_with_attention,
    record_attention,
)

__all__ = ["AttentionRecording", "ImageAttention", "detections_with_attention", "record_attention"]
