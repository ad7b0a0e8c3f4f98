"""One run of tools/predict_onnx.py over its inputs: predictions.json as tools/demo.py writes
it (same records, same threshold semantics), a drawing per image where OpenCV is present."""
import argparse
import logging
import os
import sys

from detr_d2_deploy.errors import DeployError, UnreadableImage
from detr_d2_deploy.images import read_image
from detr_d2_deploy.inputs import InputFailure, batched, is_video
from detr_d2_deploy.outputs import can_draw, coco_records, draw_detections, write_png

__all__ = ["EXIT_INPUT_FAILED", "EXIT_SETUP_ERROR", "PredictionRun", "fraction", "make_output_folder",
           "positive_int", "run_tool"]

EXIT_INPUT_FAILED = 1
EXIT_SETUP_ERROR = 2

logger = logging.getLogger("detr_d2_deploy")


def fraction(text):
    """argparse type: a number between 0 and 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def run_tool(main, argv=None):
    """``main(argv)``'s exit status; a DeployError is printed as one ``ERROR:`` line on
    stderr and gives EXIT_SETUP_ERROR."""
    try:
        return main(argv)
    except DeployError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return EXIT_SETUP_ERROR


class PredictionRun:
    """Runs ``predictor`` (an ``OnnxDetrPredictor``) over image files ``batch_size`` at a
    time; keeps the records of detections scoring at least ``threshold`` and the inputs
    that failed; draws into ``output_paths`` (an ``OutputPaths``) when OpenCV is present."""

    def __init__(self, predictor, threshold, batch_size, output_paths):
        self.predictor = predictor
        self.spec = predictor.spec
        self.threshold = threshold
        self.batch_size = batch_size
        self.output_paths = output_paths
        self.records = []
        self.failures = []

    def fail(self, path, reason):
        logger.warning(f"Skipped {path}: {reason}")
        self.failures.append(InputFailure(path, reason))

    def _readable_images(self, paths):
        """(path, HWC uint8 image in the export's channel order) of each readable image."""
        for path in paths:
            if is_video(path):
                self.fail(path, "videos are not supported by predict_onnx.py; run tools/demo.py on them")
                continue
            try:
                yield path, read_image(path, self.spec.channel_order)
            except UnreadableImage as error:
                self.fail(path, str(error))

    def _save_result(self, path, image, detections):
        self.records.extend(coco_records(detections, path, self.spec))
        if can_draw():
            bgr = image[:, :, ::-1] if self.spec.channel_order == "RGB" else image
            write_png(self.output_paths.path_for(path, ".png"), draw_detections(bgr, detections, self.spec))

    def run_on(self, paths):
        """Predict on every readable file of ``paths``, in order and in batches."""
        for batch in batched(self._readable_images(paths), self.batch_size):
            batch_paths, images = zip(*batch)
            for path, image, detections in zip(batch_paths, images, self.predictor(list(images))):
                self._save_result(path, image, detections.confident(self.threshold))
            logger.info(f"{len(self.records)} detections so far, {batch_paths[-1]} done")

    def report(self, num_inputs, predictions_path):
        """Log the summary; the exit status (EXIT_INPUT_FAILED if an input failed)."""
        logger.info(f"{len(self.records)} detections >= {self.threshold} written to {predictions_path}")
        if not can_draw():
            logger.info("OpenCV is not installed: no drawings")
        if not self.failures:
            return 0
        lines = "\n".join(f"  {failure.path}: {failure.reason}" for failure in self.failures)
        logger.error(f"{len(self.failures)} of {num_inputs} inputs failed and were skipped:\n{lines}")
        return EXIT_INPUT_FAILED


def make_output_folder(path):
    """Create the folder ``path`` (and its parents) if needed; DeployError if impossible."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise DeployError(f"Cannot create the output folder {path}: {error}") from error
    return path
