"""Checkpoint conversion from the reference DETR, and safe checkpoint file I/O."""
from detr_d2.checkpoint.convert import ConversionError, convert_state_dict, extract_state_dict
from detr_d2.checkpoint.io import CheckpointError, atomic_torch_save, atomic_write, load_checkpoint_file

__all__ = ["CheckpointError", "ConversionError", "atomic_torch_save", "atomic_write", "convert_state_dict",
           "extract_state_dict", "load_checkpoint_file"]
