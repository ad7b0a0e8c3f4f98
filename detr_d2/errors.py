"""The two kinds of error that end a run with one message instead of a traceback.

``SetupError``: a mistake in what the user gave (config, datasets, images, checkpoint files,
command-line arguments); its message names the culprit and the fix. The specific kinds
derive from it, so that catching ``SetupError`` catches them all:
``detr_d2.data.DatasetError``, ``detr_d2.data.image_io.BadImageError``,
``detr_d2.checkpoint.CheckpointError`` and ``detr_d2.checkpoint.ConversionError``.

``NonFiniteValuesError``: training diverged (NaN/inf predictions, losses or weights); the
message names the iteration and the values. It is a ``FloatingPointError``, as detectron2's
own non-finite-loss error is.

Where they are handled: ``detr_d2.engine.one_line_errors`` (tools/train_net.py and
detectron2's training loop) and ``detr_d2.utils.tool_setup.run_tool`` (the other tools).
"""

__all__ = ["NonFiniteValuesError", "SetupError"]


class SetupError(Exception):
    """A problem with the user's config, data, files or arguments; the message says what to fix."""


class NonFiniteValuesError(FloatingPointError):
    """NaN or infinite losses or weights; the message names them and the iteration."""
