"""Console progress line for DETR training.

detectron2's CommonMetricPrinter prints only the scalars whose name contains "loss", so
DETR's ``class_error`` and ``cardinality_error`` (which the model puts into the
EventStorage) would reach metrics.json and TensorBoard but never the console.
"""
import datetime
import logging

import torch
from detectron2.utils.events import EventWriter, get_event_storage

__all__ = ["MetricPrinter"]


def _is_evaluation_result(name):
    """Evaluation results ("bbox/AP", "val/loss", ...) have a "/"; they get their own tables."""
    return "/" in name


def _is_loss(name):
    return "loss" in name and not _is_evaluation_result(name)


def _is_error_metric(name):
    return name.endswith("_error") and not _is_evaluation_result(name)


class MetricPrinter(EventWriter):
    """Log one line: ETA, iteration, every training loss, every ``*_error`` metric, time,
    data_time, lr (evaluation results such as val/loss are logged by their evaluators).

    Losses and error metrics are medians over the last ``window_size`` iterations (as
    detectron2's printer does); ``time`` is the average iteration time so far (seconds),
    ``data_time`` the average over the last ``window_size`` iterations.
    """

    def __init__(self, max_iter, window_size=20):
        self.logger = logging.getLogger("detectron2")
        self._max_iter = max_iter
        self._window_size = window_size

    def _median(self, history):
        return history.median(self._window_size)

    def _metrics_text(self, storage):
        histories = storage.histories()
        names = ([n for n in histories if _is_loss(n)]
                 + [n for n in histories if _is_error_metric(n)])
        return "  ".join(f"{n}: {self._median(histories[n]):.4g}" for n in names)

    def _timing_text(self, storage):
        histories = storage.histories()
        parts = []
        if "time" in histories:
            remaining = self._max_iter - storage.iter - 1
            eta = datetime.timedelta(seconds=int(histories["time"].median(1000) * remaining))
            parts = [f"eta: {eta}", f"time: {histories['time'].global_avg():.4f}"]
        if "data_time" in histories:
            parts.append(f"data_time: {histories['data_time'].avg(self._window_size):.4f}")
        if "lr" in histories:
            parts.append(f"lr: {histories['lr'].latest():.5g}")
        if torch.cuda.is_available():
            parts.append(f"max_mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}M")
        return "  ".join(parts)

    def write(self):
        storage = get_event_storage()
        if storage.iter >= self._max_iter:  # training finished: nothing new to report
            return
        self.logger.info(f" iter: {storage.iter}  {self._metrics_text(storage)}  "
                         f"{self._timing_text(storage)}")
