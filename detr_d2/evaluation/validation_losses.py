"""DETR's criterion on a test set, as the reference's evaluation reports it.

The reference DETR (``engine.evaluate``) runs its criterion on every validation batch
and prints, besides AP, the average over the set of the weighted total ``loss``, each
weighted term (``loss_ce``, ``loss_bbox``, ``loss_giou``, ``_i`` for earlier decoder layer
i), each value unweighted (``<name>_unscaled``) and ``class_error``. It averages the
per-batch values with equal weight (``MetricLogger.update`` counts each batch once).

Here each image is one such batch: the criterion runs on each image alone (its boxes
normalised by its own box count), and the set average is the plain mean over images,
which is the reference's number at batch size 1. Every process evaluates its own images;
the per-image values are gathered and averaged with ``math.fsum`` (exactly rounded, so
the order of the images does not matter), hence one and several processes give the same
numbers.

* ``WithValidationLosses(model)``: what ``inference_on_dataset`` runs: one forward pass
  per batch gives the detections and the criterion (``Detr.inference_with_losses``);
* ``ValidationLossEvaluator``: collects them, averages, logs a table, writes
  ``validation_losses_<dataset>.json`` and returns ``{"val": {...}}``, which detectron2's
  EvalHook stores as ``val/<name>`` scalars (metrics.json, TensorBoard).
"""
import itertools
import json
import logging
import math
import os
import re

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from tabulate import tabulate
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detr_d2.checkpoint.io import atomic_write

__all__ = ["ValidationLossEvaluator", "WithValidationLosses", "average_over_images", "validation_statistics"]

RESULTS_KEY = "val"
UNSCALED_SUFFIX = "_unscaled"


def _as_floats(values):
    """{name: 0-dim tensor} -> {name: float}, read from the device in one transfer."""
    numbers = torch.stack([value.detach().float() for value in values.values()]).tolist()
    return dict(zip(values, numbers))


class WithValidationLosses(nn.Module):
    """``model`` (a ``Detr``, possibly in DistributedDataParallel) as a callable for
    ``inference_on_dataset`` that also computes the criterion in the same forward pass.

    Called with test inputs that carry "instances" (ground truth, see
    ``DetrDatasetMapper(with_instances=True)``), it returns the model's eval outputs
    [{"instances": Instances, "losses": {name: float}}]: the detections as ``model(inputs)``
    gives them and the image's unweighted criterion values. Inputs without ground truth
    get the plain outputs.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model.module if isinstance(model, DistributedDataParallel) else model

    def forward(self, batched_inputs):
        if not all("instances" in item for item in batched_inputs):
            return self.model(batched_inputs)
        results, losses = self.model.inference_with_losses(batched_inputs)
        return [dict(result, losses=_as_floats(image_losses)) for result, image_losses in zip(results, losses)]


def average_over_images(per_image):
    """{name: mean over the images that have it} of a list of {name: float} (``math.fsum``)."""
    names = list(dict.fromkeys(itertools.chain.from_iterable(per_image)))
    averages = {}
    for name in names:
        values = [values_of_image[name] for values_of_image in per_image if name in values_of_image]
        averages[name] = math.fsum(values) / len(values)
    return averages


def _display_order(name):
    """Sort key: the last decoder layer's terms first, then those of layer 0, 1, ..."""
    layer = re.search(r"_(\d+)$", name)
    return -1 if layer is None else int(layer.group(1))


def validation_statistics(averages, weight_dict):
    """The reference's statistics from the criterion's unweighted set ``averages``:

    * ``loss``: the sum of the weighted terms (the quantity training minimises);
    * each term of ``weight_dict``: its weight x its average (``loss_ce``, ``loss_bbox_0``, ...);
    * each logged-only value under its own name (``class_error``, ``cardinality_error``, ...);
    * every value unweighted as ``<name>_unscaled``.
    """
    names = sorted(averages, key=_display_order)
    weighted = {name: weight_dict[name] * averages[name] for name in names if name in weight_dict}
    statistics = {"loss": math.fsum(weighted.values()), **weighted}
    statistics.update({name: averages[name] for name in names if name not in weight_dict})
    statistics.update({name + UNSCALED_SUFFIX: averages[name] for name in names})
    return statistics


def statistics_table(averages, weight_dict):
    """A pipe table: total loss, then per criterion value its weighted and unweighted average."""
    rows = [["loss (weighted sum)", validation_statistics(averages, weight_dict)["loss"], "", ""]]
    for name in sorted(averages, key=_display_order):
        weight = weight_dict.get(name)
        weighted = "" if weight is None else weight * averages[name]
        rows.append([name, weighted, averages[name], "" if weight is None else weight])
    return tabulate(rows, headers=["criterion", "weighted", "unscaled", "weight"], tablefmt="pipe",
                    floatfmt=("", ".4f", ".4f", "g"), numalign="left", stralign="left")


class ValidationLossEvaluator(DatasetEvaluator):
    """Averages the "losses" that ``WithValidationLosses`` adds to each output over a dataset.

    ``evaluate()`` returns (main process; {} on the others, as detectron2's evaluators do)
    ``{"val": validation_statistics(...)}``, logs a table of it and writes it with the
    image count and the weights to ``output_dir/validation_losses_<dataset>.json``.
    """

    def __init__(self, dataset_name, weight_dict, output_dir=None, distributed=True):
        """
        Args:
            dataset_name (str): the test set, for the log and the file name.
            weight_dict (dict[str, float]): the criterion's weights (``criterion.weight_dict``).
            output_dir (str or None): where the json goes; None: no file.
            distributed (bool): gather the images of every process (detectron2's convention).
        """
        self._dataset_name = dataset_name
        self._weight_dict = dict(weight_dict)
        self._output_dir = output_dir
        self._distributed = distributed
        self._logger = logging.getLogger("detectron2")
        self._per_image = []

    def reset(self):
        self._per_image = []

    def process(self, inputs, outputs):
        self._per_image.extend(output["losses"] for output in outputs if "losses" in output)

    def _all_images(self):
        """The per-image values of every process (main process), [] elsewhere."""
        if not self._distributed:
            return self._per_image
        comm.synchronize()
        gathered = comm.gather(self._per_image, dst=0)
        return list(itertools.chain.from_iterable(gathered)) if comm.is_main_process() else []

    def _write(self, statistics, num_images):
        if not self._output_dir:
            return
        os.makedirs(self._output_dir, exist_ok=True)
        path = os.path.join(self._output_dir, f"validation_losses_{self._dataset_name}.json")
        report = {"dataset": self._dataset_name, "images": num_images, "statistics": statistics,
                  "weights": self._weight_dict}
        atomic_write(path, lambda file: json.dump(report, file, indent=1), binary=False)

    def evaluate(self):
        per_image = self._all_images()
        if not comm.is_main_process() and self._distributed:
            return {}
        if not per_image:
            self._logger.warning(f"No ground truth in the test batches of {self._dataset_name}: "
                                 "no validation losses (TEST.EVAL_LOSSES).")
            return {}
        averages = average_over_images(per_image)
        statistics = validation_statistics(averages, self._weight_dict)
        self._logger.info(f"DETR criterion on {self._dataset_name} ({len(per_image)} images, mean per image):\n"
                          + statistics_table(averages, self._weight_dict))
        self._write(statistics, len(per_image))
        return {RESULTS_KEY: statistics}
