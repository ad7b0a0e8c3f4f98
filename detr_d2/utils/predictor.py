"""Batch inference for the tools: model building, weight loading, test-time resizing."""
import os

import torch
from detectron2.data import transforms as T

from detr_d2.data import build_detr_augmentation
from detr_d2.engine import AtomicDetectionCheckpointer
from detr_d2.engine.build import build_model
from detr_d2.engine.config_checks import check_amp, check_device
from detr_d2.engine.precision import inference_autocast
from detr_d2.errors import SetupError

__all__ = ["BatchPredictor", "build_inference_model", "confident", "load_inference_weights"]


def load_inference_weights(model, weights, trust_pickle=False):
    """Load the checkpoint ``weights`` (MODEL.WEIGHTS) into ``model``; every tensor must fit.

    The one place where the inference tools read weights. An empty path, a missing local
    file, a file that is not a usable checkpoint (truncated, not a checkpoint, holding
    Python objects other than tensors/arrays unless ``trust_pickle``, of another model)
    raises SetupError naming the file."""
    if not weights:
        raise SetupError("MODEL.WEIGHTS is empty: give a trained checkpoint, e.g. "
                         "--opts MODEL.WEIGHTS output/model_final.pth")
    if "://" not in weights and not os.path.isfile(weights):
        raise SetupError(f"MODEL.WEIGHTS {weights} does not exist; give the path of a trained checkpoint")
    try:
        AtomicDetectionCheckpointer(model, trust_pickle=trust_pickle).load_for_inference(weights)
    except (OSError, EOFError, RuntimeError) as error:
        raise SetupError(f"Cannot load MODEL.WEIGHTS {weights}: {error}") from error


def build_inference_model(cfg, trust_pickle=False):
    """The config's model on MODEL.DEVICE, MODEL.WEIGHTS loaded, in eval mode."""
    check_device(cfg)
    check_amp(cfg)
    model = build_model(cfg)
    load_inference_weights(model, cfg.MODEL.WEIGHTS, trust_pickle)
    return model.eval()


def confident(instances, threshold):
    """The detections of ``instances`` whose score is at least ``threshold``."""
    return instances[instances.scores >= threshold]


class BatchPredictor:
    """Runs the config's model on batches of images, like detectron2's DefaultPredictor
    does on one: each image (HWC uint8, channels in INPUT.FORMAT) is resized with the
    test-time ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST) and passed with
    its original "height"/"width", so boxes come back in the original image's pixels.
    With TEST.AMP.ENABLED the model runs under autocast (scores and boxes still float32).
    ``trust_pickle``: see ``load_inference_weights``."""

    def __init__(self, cfg, trust_pickle=False):
        self.model = build_inference_model(cfg, trust_pickle)
        self.autocast = lambda: inference_autocast(cfg)
        self.image_format = cfg.INPUT.FORMAT
        self.resize = T.AugmentationList(build_detr_augmentation(cfg, is_train=False))

    @property
    def num_classes(self):
        return self.model.num_classes

    def model_input(self, image):
        """{"image": CHW uint8 tensor at the test size, "height", "width": original size}."""
        height, width = image.shape[:2]
        aug_input = T.AugInput(image)
        self.resize(aug_input)
        chw = torch.as_tensor(aug_input.image.transpose(2, 0, 1).copy())
        return {"image": chw, "height": height, "width": width}

    @property
    def panoptic(self):
        """Whether the model gives ``panoptic_seg`` (MODEL.DETR.PANOPTIC_ON)."""
        return getattr(self.model, "panoptic", None) is not None

    def outputs(self, images):
        """The model's output dict per image, on the CPU: "instances" (see ``__call__``) and,
        with ``panoptic``, "panoptic_seg" (segment ids [H, W] of the original image,
        segments_info)."""
        inputs = [self.model_input(image) for image in images]
        with torch.no_grad(), self.autocast():
            outputs = self.model(inputs)
        for output in outputs:
            output["instances"] = output["instances"].to("cpu")
            if "panoptic_seg" in output:
                seg, segments_info = output["panoptic_seg"]
                output["panoptic_seg"] = (seg.cpu(), segments_info)
        return outputs

    def __call__(self, images):
        """One CPU ``Instances`` per image with every query: ``pred_boxes`` (xyxy, absolute
        pixels of the original image), ``scores``, ``pred_classes`` (contiguous ids)."""
        return [output["instances"] for output in self.outputs(images)]
