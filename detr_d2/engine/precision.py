"""Mixed precision: the one place that decides whether and in which dtype a run autocasts.

Training (``SOLVER.AMP.ENABLED``) and inference (``TEST.AMP.ENABLED``: evaluation, eval-only,
tools/demo.py, tools/benchmark.py) run the model's forward under ``torch.autocast`` of
MODEL.DEVICE's type in the dtype of ``SOLVER.AMP.PRECISION`` (both switches share it):

* "" (default, "auto"): bfloat16 on the CPU, float16 on CUDA;
* "bfloat16": float32's exponent range, so no loss scaling; on CUDA it needs a GPU with
  bfloat16 (``torch.cuda.is_bf16_supported``);
* "float16": 3 more mantissa bits but a range that small gradients underflow, so training
  scales the loss with a ``torch.amp.GradScaler`` of the device (detectron2's AMPTrainer
  semantics: a step whose gradients hold inf/NaN is skipped and the scale lowered; that
  is normal, not an error). Training in float16 on the CPU is refused: torch's CPU
  convolution backward has no fast float16 kernel (measured: 7.9 s against 0.3 s per step
  of the tiny test model, 98% of it in ``convolution_backward``), and bfloat16 needs no
  loss scaling. float16 inference on the CPU is allowed (oneDNN's forward convolutions
  and matmuls have float16 kernels on CPUs with AVX512-FP16).

What stays float32 under autocast (see docs/architecture.md, "Mixed precision"): the
criterion and Hungarian matcher (``modeling.float32.float32_island``: softmax probabilities
for the class cost, GIoU of small boxes and the loss sums need fp32's mantissa; bf16's 8 bits
would reorder near-equal matching costs), the inference post-processing (scores, boxes and
masks come out float32), the optimizer's parameters and state (autocast casts copies of the
weights; the parameters, AdamW moments and the update stay float32), and everything torch's
autocast keeps in float32 itself (cross-entropy, cdist, reductions it lists).
"""
import contextlib
import functools
import logging
import platform

import torch

from detr_d2.errors import SetupError

__all__ = [
    "AUTO",
    "PRECISIONS",
    "autocast",
    "autocast_dtype",
    "check_precision",
    "inference_autocast",
    "inference_dtype",
    "native_cpu_support",
    "needs_grad_scaler",
    "training_dtype",
    "warn_if_emulated",
]

logger = logging.getLogger(__name__)

AUTO = ""
PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_AUTO_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}
# /proc/cpuinfo flags of CPUs that compute in the dtype natively (x86 AVX-512/AMX, Arm)
_NATIVE_CPU_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
                     torch.float16: ("avx512_fp16", "amx_fp16", "asimdhp")}


def autocast_dtype(precision, device):
    """The dtype of SOLVER.AMP.PRECISION ``precision`` ("" / "float16" / "bfloat16") on
    ``device`` (str or torch.device): "" is bfloat16 on the CPU, float16 on CUDA."""
    device_type = torch.device(device).type
    if precision == AUTO:
        if device_type not in _AUTO_DTYPE:
            raise SetupError(f"SOLVER.AMP.PRECISION is '' (auto) but MODEL.DEVICE {device!r} has no "
                             "default mixed-precision dtype; set SOLVER.AMP.PRECISION 'bfloat16' or 'float16'.")
        return _AUTO_DTYPE[device_type]
    if precision not in PRECISIONS:
        raise SetupError(f"SOLVER.AMP.PRECISION is {precision!r} but must be one of '' (auto: bfloat16 "
                         "on the CPU, float16 on CUDA), 'bfloat16', 'float16'; fix the value.")
    return PRECISIONS[precision]


def training_dtype(cfg):
    """The autocast dtype of training (SOLVER.AMP.ENABLED), None for float32 training."""
    return autocast_dtype(cfg.SOLVER.AMP.PRECISION, cfg.MODEL.DEVICE) if cfg.SOLVER.AMP.ENABLED else None


def inference_dtype(cfg):
    """The autocast dtype of inference (TEST.AMP.ENABLED), None for float32 inference."""
    return autocast_dtype(cfg.SOLVER.AMP.PRECISION, cfg.MODEL.DEVICE) if cfg.TEST.AMP.ENABLED else None


def needs_grad_scaler(dtype):
    """float16 training scales the loss (its gradients underflow); bfloat16 and float32 do not."""
    return dtype == torch.float16


def check_precision(cfg):
    """SOLVER.AMP.PRECISION names a dtype the device can autocast to (when either AMP switch
    is on), not float16 for training on the CPU; warns once when the CPU only emulates it."""
    for dtype in {training_dtype(cfg), inference_dtype(cfg)} - {None}:
        device = torch.device(cfg.MODEL.DEVICE)
        if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.is_available() \
                and not torch.cuda.is_bf16_supported():
            raise SetupError("SOLVER.AMP.PRECISION is 'bfloat16' but this GPU has no bfloat16; use "
                             "SOLVER.AMP.PRECISION 'float16' (with loss scaling) or '' (auto).")
        if device.type == "cpu" and dtype == torch.float16 and dtype == training_dtype(cfg):
            raise SetupError("SOLVER.AMP.ENABLED with SOLVER.AMP.PRECISION 'float16' on MODEL.DEVICE 'cpu': "
                             "torch's float16 convolution backward on the CPU is about 25x slower than float32; "
                             "train with SOLVER.AMP.PRECISION 'bfloat16' (or '', auto) on the CPU.")
        if device.type not in ("cpu", "cuda"):
            raise SetupError(f"SOLVER.AMP.ENABLED / TEST.AMP.ENABLED need MODEL.DEVICE 'cpu' or 'cuda', "
                             f"not {cfg.MODEL.DEVICE!r}; switch them off to run in float32.")
        warn_if_emulated(device, dtype)


@functools.lru_cache(maxsize=None)
def _cpu_flags():
    """The CPU feature flags of /proc/cpuinfo (Linux), empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_cpu_support(dtype):
    """Whether this CPU computes ``dtype`` natively (AVX512-BF16 / AMX-BF16, AVX512-FP16 /
    AMX-FP16, Arm BF16 / FP16), or True where that cannot be told (no /proc/cpuinfo: macOS
    and Windows; oneDNN's own check decides there)."""
    flags = _cpu_flags()
    if not flags:
        check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
        return bool(getattr(torch.ops.mkldnn, check)())
    return any(flag in flags for flag in _NATIVE_CPU_FLAGS[dtype])


@functools.lru_cache(maxsize=None)
def warn_if_emulated(device, dtype):
    """Log once per (device, dtype) that CPU autocast to ``dtype`` will be slow on a CPU
    without native support for it (it then runs as emulated conversions)."""
    if torch.device(device).type == "cpu" and not native_cpu_support(dtype):
        logger.warning(f"Mixed precision in {dtype} on this CPU ({platform.processor() or platform.machine()}) "
                       f"is emulated (no {' / '.join(_NATIVE_CPU_FLAGS[dtype][:2])}): expect it to be slower "
                       "than float32; switch SOLVER.AMP.ENABLED / TEST.AMP.ENABLED off.")


def autocast(device, dtype):
    """``torch.autocast`` of ``device``'s type to ``dtype``; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def inference_autocast(cfg):
    """The context every inference of ``cfg``'s model runs in (TEST.AMP.ENABLED)."""
    return autocast(cfg.MODEL.DEVICE, inference_dtype(cfg))
