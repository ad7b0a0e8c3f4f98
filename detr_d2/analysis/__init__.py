"""Looking inside a trained model: ``attention_maps`` records what DETR's last decoder layer's
queries and last encoder layer attend to; ``sampling_points`` where the multi-scale DETRs'
deformable attention samples (tools/visualize_attention.py draws both)."""
from detr_d2.analysis.attention_maps import (
    AttentionRecording,
    ImageAttention,
    detections_with_attention,
    record_attention,
)
from detr_d2.analysis.sampling_points import (
    ImageSampling,
    SamplingRecording,
    detection_queries,
    detections_with_sampling,
    feature_level_count,
    has_sampling_points,
    record_sampling,
)

__all__ = ["AttentionRecording", "ImageAttention", "ImageSampling", "SamplingRecording", "detection_queries",
           "detections_with_attention", "detections_with_sampling", "feature_level_count", "has_sampling_points",
           "record_attention", "record_sampling"]
