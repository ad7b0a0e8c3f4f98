"""``OnnxDetrPredictor``: an exported DETR run by onnxruntime on batches of images."""
import os

import onnxruntime

from detr_d2_deploy.detections import detections_from_outputs
from detr_d2_deploy.errors import DeployError
from detr_d2_deploy.images import normalised, padded_batch, resized
from detr_d2_deploy.spec import BOXES, IMAGE_SIZES, IMAGES, LOGITS, read_spec

__all__ = ["OnnxDetrPredictor", "onnx_session"]


def onnx_session(path, num_threads=None):
    """An onnxruntime CPU session of the ONNX file ``path`` (``num_threads`` intra-op
    threads; None: onnxruntime's default, one per physical core); DeployError if the file
    is missing or not a model onnxruntime can load."""
    if not os.path.isfile(path):
        raise DeployError(f"{path} does not exist: export the model with tools/export_model.py --format onnx")
    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types, by failure
        raise DeployError(f"onnxruntime cannot load {path}: {error}") from error


class OnnxDetrPredictor:
    """Runs ``model_dir/model.onnx`` as tools/demo.py runs the PyTorch model.

    Each image (HWC uint8, channels in ``spec.channel_order``) is resized with the export's
    test-time rule, normalised, and batched with the others (zero padding at the
    bottom/right); detections come back in the original image's pixels.
    """

    def __init__(self, model_dir, num_threads=None):
        self.spec = read_spec(model_dir)
        if self.spec.format != "onnx":
            raise DeployError(f"{model_dir} holds a {self.spec.format} export; this predictor runs ONNX "
                              "exports (tools/export_model.py --format onnx)")
        self.session = onnx_session(os.path.join(model_dir, self.spec.model_file), num_threads)

    def prepare(self, images):
        """(images float32 [B, 3, H, W], image_sizes int64 [B, 2]): the graph's inputs."""
        spec = self.spec
        chw = [normalised(resized(image, spec.shortest_edge, spec.max_size), spec.pixel_mean, spec.pixel_std)
               for image in images]
        return padded_batch(chw)

    def run(self, batch, image_sizes):
        """(logits [B, Q, K+1], boxes [B, Q, 4] normalised cxcywh) of a prepared batch."""
        logits, boxes = self.session.run([LOGITS, BOXES], {IMAGES: batch, IMAGE_SIZES: image_sizes})
        return logits, boxes

    def __call__(self, images):
        """One ``Detections`` per HWC uint8 image, every query, boxes in its own pixels."""
        logits, boxes = self.run(*self.prepare(images))
        return [detections_from_outputs(lg, bx, image.shape[:2]) for lg, bx, image in zip(logits, boxes, images)]
