"""onnxruntime vs the eager model (fast paths as configured) on one image, timed in turns.

Both sides do the same work per call: normalise and pad the image, run the network, turn
the outputs into detections (eager: ``Detr.forward``; ONNX: detr_d2_deploy's
``normalised``/``padded_batch``, ``session.run``, ``detections_from_outputs``). Runs
alternate (ONNX, eager, ONNX, ...) so that the load of a shared machine falls on both alike.
"""
import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from detr_d2_deploy.detections import detections_from_outputs
from detr_d2_deploy.images import normalised, padded_batch
from detr_d2_deploy.spec import BOXES, IMAGE_SIZES, IMAGES, LOGITS

__all__ = ["Timings", "time_in_turns"]


@dataclass
class Timings:
    """Wall seconds per call of each side in the order run, this process's CPU seconds
    per call (all threads), and the 1-minute load averages read before and after."""

    onnx: list = field(default_factory=list)
    eager: list = field(default_factory=list)
    onnx_cpu: list = field(default_factory=list)
    eager_cpu: list = field(default_factory=list)
    load_before: float = 0.0
    load_after: float = 0.0

    def summary_lines(self):
        onnx, eager = statistics.median(self.onnx), statistics.median(self.eager)
        return [f"onnxruntime: median {onnx:.3f} s (min {min(self.onnx):.3f}, max {max(self.onnx):.3f}) "
                f"over {len(self.onnx)} runs",
                f"eager PyTorch: median {eager:.3f} s (min {min(self.eager):.3f}, max {max(self.eager):.3f}) "
                f"over {len(self.eager)} runs",
                f"CPU seconds per call (all threads), median: onnxruntime {statistics.median(self.onnx_cpu):.3f}, "
                f"eager {statistics.median(self.eager_cpu):.3f}",
                f"onnxruntime / eager: {onnx / eager:.2f} (per-round ratios "
                f"{', '.join(f'{o / e:.2f}' for o, e in zip(self.onnx, self.eager))})",
                f"load average (1 min) before {self.load_before:.2f}, after {self.load_after:.2f} "
                f"on {os.cpu_count()} cores"]


def _seconds(function):
    """(wall seconds, process CPU seconds) of one call of ``function``."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_in_turns(model, session, spec, image, rounds, warmup=1):
    """``Timings`` of ``rounds`` alternating calls of ``session`` (onnxruntime, graph of
    ``spec``) and ``model`` (eager, eval mode) on the HWC uint8 ``image`` (network-input
    size), after ``warmup`` untimed calls of each."""
    eager_input = [{"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))}]

    def run_onnx():
        batch, sizes = padded_batch([normalised(image, spec.pixel_mean, spec.pixel_std)])
        logits, boxes = session.run([LOGITS, BOXES], {IMAGES: batch, IMAGE_SIZES: sizes})
        detections_from_outputs(logits[0], boxes[0], image.shape[:2], spec.topk)

    def run_eager():
        with torch.no_grad():
            model(eager_input)

    for _ in range(warmup):
        run_onnx(), run_eager()
    timings = Timings(load_before=os.getloadavg()[0])
    for _ in range(rounds):
        for wall_times, cpu_times, function in ((timings.onnx, timings.onnx_cpu, run_onnx),
                                                (timings.eager, timings.eager_cpu, run_eager)):
            wall, cpu = _seconds(function)
            wall_times.append(wall)
            cpu_times.append(cpu)
    timings.load_after = os.getloadavg()[0]
    return timings
