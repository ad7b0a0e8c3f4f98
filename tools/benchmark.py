#!/usr/bin/env python
"""Time a model's training iterations, inference or data loading on this machine.

    python tools/benchmark.py --config-file CFG --task {train,eval,data} [--input-size HxW] \\
        [--iters N] [--warmup N] [--compare-plain] [--precision {both,float32,amp}] [[--opts] KEY VALUE ...]

Like detectron2's tools/benchmark.py. The model is built from the config with random
weights (MODEL.WEIGHTS is not loaded: timings do not depend on the values), on
MODEL.DEVICE (the CPU when CUDA is absent). The first --warmup iterations are not timed.

* ``train``: forward + criterion (matcher included) + backward + optimizer step (with the
  config's gradient clipping), batches of SOLVER.IMS_PER_BATCH held in memory. Also
  reports the share of the iteration spent in the Hungarian matcher.
* ``eval``: inference (no_grad, eval mode) of batches of one image held in memory,
  pre- and post-processing included.
  With --input-size both synthesise their images: random pixels of H x W, for training
  5 random boxes of random classes per image. Without it, they take their batches from
  the config's DATASETS.TRAIN (train) / first DATASETS.TEST (eval) loader, read once.
* ``data``: time per batch of the DATASETS.TRAIN loader (DetrDatasetMapper,
  DATALOADER.NUM_WORKERS workers) when nothing else runs.

Printed per variant: median, min/max and quartiles of the seconds per iteration, images/s,
the median process CPU seconds per iteration (all threads: compared with the wall time it
shows how much of the cores the run had on a shared machine), the peak resident memory of
the process during the timed iterations (VmHWM, reset before each iteration; ru_maxrss,
the peak since the start, where it cannot be reset) and, for train, the matcher's share.
--compare-plain (train, eval) runs the same model (and optimizer) with its fast paths
off too (MODEL.DETR.FAST_PATHS, SOLVER.FUSED_OPTIMIZER), alternating fast and plain
iterations in this process, and prints the ratio fast / plain; for eval also the largest
difference between their outputs.
--precision (train, eval): "both" (default) times each variant in float32 and under mixed
precision ("fast bf16" beside "fast": the autocast of SOLVER.AMP.PRECISION on MODEL.DEVICE,
bfloat16 on the CPU; training steps as SOLVER.AMP.ENABLED runs them, inference as
TEST.AMP.ENABLED does), alternating too, and prints the ratio AMP / float32 (for eval
also their largest output difference); "float32" or "amp" times one of them.
"""
import itertools
import resource
import statistics
import sys
import time

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)
import torch
from detectron2.engine import SimpleTrainer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from detr_d2.acceleration import set_fast_paths
from detr_d2.engine import Trainer, build_config
from detr_d2.engine.build import build_model
from detr_d2.engine.amp_trainer import DetrAMPTrainer
from detr_d2.engine.optimizer import set_fused_step
from detr_d2.engine.precision import autocast, autocast_dtype, warn_if_emulated
from detr_d2.utils.tool_arguments import ToolArgumentParser, add_config_arguments
from detr_d2.utils.tool_setup import input_size, positive_int, run_tool, setup_tool_logging

BOXES_PER_IMAGE = 5
FAST, PLAIN = "fast", "plain"
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def build_parser():
    parser = ToolArgumentParser(__doc__)
    add_config_arguments(parser, help="config of the model", example="MODEL.DEVICE cpu SOLVER.IMS_PER_BATCH 2")
    parser.add_argument("--task", required=True, choices=("train", "eval", "data"))
    parser.add_argument("--input-size", type=input_size, metavar="HxW",
                        help="synthesise H x W images (train, eval) instead of reading the datasets")
    parser.add_argument("--iters", type=positive_int, default=10, help="timed iterations (per variant)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (per variant)")
    parser.add_argument("--compare-plain", action="store_true",
                        help="also time the plain path (fast paths off), alternating, and print the ratio")
    parser.add_argument("--precision", choices=("both", "float32", "amp"), default="both",
                        help="float32, mixed precision (SOLVER.AMP.PRECISION's autocast), or both "
                             "alternating (default)")
    return parser


# ---------------------------------------------------------------- peak memory

class PeakMemory:
    """Peak resident memory of this process (Linux: VmHWM, which ``reset`` restarts)."""

    def __init__(self):
        self.resettable = self._write_clear_refs()

    @staticmethod
    def _write_clear_refs():
        try:
            with open("/proc/self/clear_refs", "w") as file:
                file.write("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    def reset(self):
        if self.resettable:
            self._write_clear_refs()

    def read(self):
        """Bytes: VmHWM (peak since the last reset) or ru_maxrss (peak since the start)."""
        if self.resettable:
            with open("/proc/self/status") as file:
                for line in file:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- inputs

def synthetic_image(height, width, generator):
    """uint8 [3, H, W] of random pixels."""
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def synthetic_instances(height, width, num_classes, generator):
    """``BOXES_PER_IMAGE`` random boxes (xyxy pixels, sides 5-50% of the image) and classes."""
    size = torch.tensor([width, height, width, height], dtype=torch.float32)
    extent = 0.05 + 0.45 * torch.rand(BOXES_PER_IMAGE, 2, generator=generator)
    corner = (1 - extent) * torch.rand(BOXES_PER_IMAGE, 2, generator=generator)
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.cat([corner, corner + extent], dim=1) * size)
    instances.gt_classes = torch.randint(0, num_classes, (BOXES_PER_IMAGE,), generator=generator)
    return instances


def synthetic_batch(cfg, size, batch_size, training, generator):
    """A list of ``batch_size`` model inputs of ``size`` (H, W), with instances if ``training``."""
    batch = []
    for _ in range(batch_size):
        item = {"image": synthetic_image(*size, generator)}
        if training:
            item["instances"] = synthetic_instances(*size, cfg.MODEL.DETR.NUM_CLASSES, generator)
        batch.append(item)
    return batch


def loader_batches(cfg, training, count):
    """The first ``count`` batches of the train loader or of the first DATASETS.TEST loader."""
    loader = Trainer.build_train_loader(cfg) if training else Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    return list(itertools.islice(loader, count))


def benchmark_batches(cfg, args, training):
    """Batches for the timed runs: ``warmup + iters`` distinct ones (cycled when reused)."""
    count = args.warmup + args.iters
    if args.input_size is None:
        return loader_batches(cfg, training, count)
    generator = torch.Generator().manual_seed(0)
    batch_size = cfg.SOLVER.IMS_PER_BATCH if training else 1
    return [synthetic_batch(cfg, args.input_size, batch_size, training, generator) for _ in range(count)]


# ---------------------------------------------------------------- runs

class ModuleTimer:
    """Seconds spent in ``module``'s forward since the last ``reset`` (forward hooks)."""

    def __init__(self, module):
        self.seconds = 0.0
        self._start = None
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, module, inputs):
        self._start = time.perf_counter()

    def _after(self, module, inputs, outputs):
        self.seconds += time.perf_counter() - self._start

    def reset(self):
        self.seconds = 0.0


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def variant_name(path, dtype):
    """"fast" / "plain" in float32 (dtype None), "fast bf16" / "plain bf16" ... under autocast."""
    return path if dtype is None else f"{path} {DTYPE_NAMES[dtype]}"


def benchmark_variants(cfg, args):
    """{name: (path, autocast dtype or None)} of the variants to time, in order."""
    paths = (FAST, PLAIN) if args.compare_plain else (FAST,)
    amp = autocast_dtype(cfg.SOLVER.AMP.PRECISION, cfg.MODEL.DEVICE)
    dtypes = {"both": (None, amp), "float32": (None,), "amp": (amp,)}[args.precision]
    return {variant_name(path, dtype): (path, dtype) for dtype in dtypes for path in paths}


class Runner:
    """One model (and optimizer, for training) whose fast paths and precision can be switched;
    ``run`` does one iteration of the task and returns its seconds and outputs. A training
    iteration is detectron2's ``SimpleTrainer.run_step`` on the given batch (float32) or
    ``DetrAMPTrainer.run_step`` (mixed precision, as SOLVER.AMP.ENABLED trains)."""

    def __init__(self, cfg, training, amp_dtype):
        self.cfg = cfg
        self.training = training
        self.model = build_model(cfg).train(training)
        self.matcher_timer = ModuleTimer(self.model.criterion.matcher)
        self.optimizer = Trainer.build_optimizer(cfg, self.model) if training else None
        self._batch = None
        self.dtype = None
        self.trainers = {}
        if training:
            self.trainers[None] = SimpleTrainer(self.model, self._current_batch(), self.optimizer)
            self.trainers[amp_dtype] = DetrAMPTrainer(self.model, self._current_batch(), self.optimizer,
                                                      cfg.MODEL.DEVICE, amp_dtype)
        self.iteration = 0

    def _current_batch(self):
        """The endless "data loader" of the trainer: the batch ``run`` was given."""
        while True:
            yield self._batch

    def use(self, path, dtype):
        """Switch to the ``FAST`` path (the config's choices) or the ``PLAIN`` one, in float32
        (``dtype`` None) or under autocast to ``dtype``."""
        fast = path == FAST
        set_fast_paths(self.model, fast and self.cfg.MODEL.DETR.FAST_PATHS)
        if self.optimizer is not None:
            set_fused_step(self.optimizer, fast and self.cfg.SOLVER.FUSED_OPTIMIZER)
        self.dtype = dtype

    def _train_step(self, batch):
        self._batch = batch
        trainer = self.trainers[self.dtype]
        trainer.iter = self.iteration
        with EventStorage(self.iteration):
            trainer.run_step()
        self.iteration += 1

    def _inference(self, batch):
        with torch.no_grad(), autocast(self.cfg.MODEL.DEVICE, self.dtype):
            return self.model(batch)

    def run(self, batch):
        """(seconds, process CPU seconds, matcher seconds, outputs (None in training)) of one
        iteration on ``batch``."""
        self.matcher_timer.reset()
        synchronize(self.cfg.MODEL.DEVICE)
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = self._train_step(batch) if self.training else self._inference(batch)
        synchronize(self.cfg.MODEL.DEVICE)
        seconds = time.perf_counter() - start
        return seconds, time.process_time() - cpu_start, self.matcher_timer.seconds, outputs


def variant_order(index, variants):
    """Alternate which variant goes first, so that slow drifts of the machine cancel."""
    return variants if index % 2 == 0 else variants[::-1]


def timed_runs(runner, batches, args, variants):
    """{variant name: {"seconds", "cpu", "matcher", "peak", "outputs"}: lists over the timed
    iterations}; ``variants``: {name: (path, dtype)}."""
    memory = PeakMemory()
    records = {v: {"seconds": [], "cpu": [], "matcher": [], "peak": [], "outputs": []} for v in variants}
    for index in range(args.warmup + args.iters):
        batch = batches[index % len(batches)]
        for variant in variant_order(index, tuple(variants)):
            runner.use(*variants[variant])
            memory.reset()
            seconds, cpu, matcher, outputs = runner.run(batch)
            if index >= args.warmup:
                record = records[variant]
                record["seconds"].append(seconds)
                record["cpu"].append(cpu)
                record["matcher"].append(matcher / seconds)
                record["peak"].append(memory.read())
                record["outputs"].append(outputs)
    return records


def time_data_loader(cfg, args):
    """{"seconds": [...], "peak": [...]}: the wait for each of ``iters`` batches after ``warmup``."""
    loader = iter(Trainer.build_train_loader(cfg))
    for _ in range(args.warmup):
        next(loader)
    memory, seconds, peaks = PeakMemory(), [], []
    for _ in range(args.iters):
        memory.reset()
        start = time.perf_counter()
        next(loader)
        seconds.append(time.perf_counter() - start)
        peaks.append(memory.read())
    return {"seconds": seconds, "peak": peaks}


# ---------------------------------------------------------------- report

def spread_text(seconds):
    """"median s/iter (min .. max, quartiles q1 .. q3)"."""
    q1, _, q3 = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else (seconds[0],) * 3
    return (f"median {statistics.median(seconds):.4f} s/iter (min {min(seconds):.4f}, max {max(seconds):.4f}, "
            f"quartiles {q1:.4f} .. {q3:.4f}, n={len(seconds)})")


def variant_text(name, record, images_per_iter, training):
    median = statistics.median(record["seconds"])
    text = (f"{name:>10}: {spread_text(record['seconds'])}, {images_per_iter / median:.2f} images/s, "
            f"process CPU {statistics.median(record['cpu']):.4f} s/iter, "
            f"peak RSS {max(record['peak']) / 2 ** 30:.2f} GiB")
    if training:
        text += f", matcher {100 * statistics.median(record['matcher']):.1f}% of the iteration"
    return text


def ratio_text(records, numerator, denominator):
    top, bottom = records[numerator]["seconds"], records[denominator]["seconds"]
    pairs = [f / p for f, p in zip(top, bottom)]
    return (f"ratio {numerator}/{denominator}: {statistics.median(top) / statistics.median(bottom):.3f} (medians); "
            f"per pair: median {statistics.median(pairs):.3f}, min {min(pairs):.3f}, max {max(pairs):.3f}")


def instances_difference(fast_outputs, plain_outputs):
    """(largest |score difference|, largest |box difference| / image side) over all outputs."""
    score, box = 0.0, 0.0
    for fast, plain in zip(itertools.chain(*fast_outputs), itertools.chain(*plain_outputs)):
        a, b = fast["instances"], plain["instances"]
        height, width = a.image_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        score = max(score, (a.scores - b.scores).abs().max().item())
        box = max(box, ((a.pred_boxes.tensor - b.pred_boxes.tensor).abs() / scale).max().item())
    return score, box


def describe_inputs(cfg, args, training):
    batch = cfg.SOLVER.IMS_PER_BATCH if training else 1
    if args.input_size is None:
        return f"batches of {'DATASETS.TRAIN' if training else cfg.DATASETS.TEST[0]}"
    height, width = args.input_size
    boxes = f", {BOXES_PER_IMAGE} boxes each" if training else ""
    return f"{batch} synthetic image(s) of {height}x{width}{boxes}"


def compared_pairs(variants):
    """(numerator, denominator) names to compare: fast vs plain in each precision, then each
    path under autocast vs in float32."""
    pairs = [(variant_name(FAST, dtype), variant_name(PLAIN, dtype))
             for path, dtype in variants.values() if path == PLAIN]
    pairs += [(name, variant_name(path, None)) for name, (path, dtype) in variants.items()
              if dtype is not None and variant_name(path, None) in variants]
    return pairs


def report_model_task(cfg, args, records, training, variants):
    images_per_iter = cfg.SOLVER.IMS_PER_BATCH if training else 1
    print(f"{args.config_file}  task {args.task}  input: {describe_inputs(cfg, args, training)}  "
          f"device {cfg.MODEL.DEVICE}, {torch.get_num_threads()} torch threads")
    for name, record in records.items():
        print(variant_text(name, record, images_per_iter, training))
    for numerator, denominator in compared_pairs(variants):
        print(ratio_text(records, numerator, denominator))
        if not training:
            score, box = instances_difference(records[numerator]["outputs"], records[denominator]["outputs"])
            print(f"largest difference {numerator} vs {denominator}: score {score:.2e}, box / image side {box:.2e}")


def report_data_task(cfg, args, record):
    batch = cfg.SOLVER.IMS_PER_BATCH
    print(f"{args.config_file}  task data  {batch} images per batch, "
          f"{cfg.DATALOADER.NUM_WORKERS} workers")
    print(f" data: {spread_text(record['seconds'])}, {batch / statistics.median(record['seconds']):.1f} images/s, "
          f"peak RSS (main process) {max(record['peak']) / 2 ** 30:.2f} GiB")


# ---------------------------------------------------------------- main

def benchmark_model(cfg, args):
    training = args.task == "train"
    batches = benchmark_batches(cfg, args, training)
    torch.manual_seed(0)
    runner = Runner(cfg, training, autocast_dtype(cfg.SOLVER.AMP.PRECISION, cfg.MODEL.DEVICE))
    variants = benchmark_variants(cfg, args)
    for _, dtype in variants.values():
        if dtype is not None:
            warn_if_emulated(cfg.MODEL.DEVICE, dtype)
    report_model_task(cfg, args, timed_runs(runner, batches, args, variants), training, variants)


def default_device_opts():
    """MODEL.DEVICE cpu when CUDA is absent (the user's KEY VALUE list may still set it)."""
    return [] if torch.cuda.is_available() else ["MODEL.DEVICE", "cpu"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.compare_plain and args.task == "data":
        build_parser().error("--compare-plain applies to --task train and eval")
    setup_tool_logging()
    cfg = build_config(args.config_file, [*default_device_opts(), *args.opts])
    if args.task == "data":
        report_data_task(cfg, args, time_data_loader(cfg, args))
    else:
        benchmark_model(cfg, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
