"""``OnnxDetrPredictor``: an exported DETR run by onnxruntime on batches of images."""
import os

import onnxruntime

from detr_d2_deploy.detections import binary_masks, detections_from_outputs
from detr_d2_deploy.errors import DeployError
from detr_d2_deploy.images import normalised, padded_batch, resized
from detr_d2_deploy.spec import IMAGE_SIZES, IMAGES, read_spec

__all__ = ["OnnxDetrPredictor", "batch_detections", "onnx_session"]


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


def batch_detections(outputs, padded_size, image_sizes, original_sizes, spec):
    """One ``Detections`` per image of a batch from the graph's ``outputs`` (see
    ``OnnxDetrPredictor.run``): ``padded_size`` (H, W) of the batch, ``image_sizes`` [B, 2]
    its unpadded sizes, ``original_sizes`` the (height, width) to report in."""
    results = []
    for index, original_size in enumerate(original_sizes):
        detections = detections_from_outputs(outputs[0][index], outputs[1][index], original_size, spec.topk)
        if spec.has_masks:
            detections.masks = binary_masks(outputs[2][index], padded_size, image_sizes[index], original_size,
                                            spec.mask_threshold)
        results.append(detections)
    return results


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
        """The graph's outputs for a prepared batch: [logits [B, Q, K+1] (softmax export) or
        [B, Q, K] (sigmoid top-k export), boxes [B, Q, 4] normalised cxcywh] and, for a
        MODEL.MASK_ON export, mask logits [B, Q, h2, w2]."""
        return self.session.run(self.spec.output_names, {IMAGES: batch, IMAGE_SIZES: image_sizes})

    def __call__(self, images):
        """One ``Detections`` per HWC uint8 image, every query, boxes (and masks) in its own
        pixels."""
        batch, image_sizes = self.prepare(images)
        return batch_detections(self.run(batch, image_sizes), batch.shape[2:], image_sizes,
                                [image.shape[:2] for image in images], self.spec)
