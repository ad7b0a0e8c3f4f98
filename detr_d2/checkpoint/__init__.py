"""Checkpoint conversion (the reference DETR, its detectron2 wrapper, transformers DETR; see
``layouts``), and safe checkpoint file I/O."""
from detr_d2.checkpoint.convert import ConversionError, convert_state_dict, extract_state_dict
from detr_d2.checkpoint.io import CheckpointError, atomic_torch_save, atomic_write, load_checkpoint_file
from detr_d2.checkpoint.layouts import LayoutError, read_layout

__all__ = ["CheckpointError", "ConversionError", "LayoutError", "atomic_torch_save", "atomic_write",
           "convert_state_dict", "extract_state_dict", "load_checkpoint_file", "read_layout"]
