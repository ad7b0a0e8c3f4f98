"""Every detectron2-version workaround of detr_d2, and nothing else.

``apply()`` runs once, from ``import detr_d2``, before detectron2's sub-packages are
imported; it imports neither torch nor detectron2 (``import detr_d2.data.shapes`` stays
light). Each workaround is a no-op where the installed detectron2 (or its dependencies)
already has the fix, so the plugin runs unchanged on detectron2 v0.6 from PyPI's
``pb1-detectron2`` sdist and on detectron2's git main branch.
"""
import importlib.abc
import importlib.machinery
import logging
import sys
import types
import warnings

import numpy as np
from PIL import Image

STUB_MARKER = "__detr_d2_stand_in__"
EXTENSION = "detectron2._C"


def _stand_in_getattr(name):
    raise AttributeError(
        f"detectron2._C.{name} is a compiled op, and detectron2's C++/CUDA extension is not "
        "installed (detr_d2 does not need it). Build detectron2 from source to use it."
    )


class _ExtensionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The finder of last resort for ``detectron2._C``: asked only when no other finder
    (i.e. no compiled extension) has it, it loads the stand-in module."""

    def find_spec(self, name, path=None, target=None):
        if name != EXTENSION:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        stand_in = types.ModuleType(EXTENSION)
        stand_in.__getattr__ = _stand_in_getattr
        stand_in.get_compiler_version = lambda: "not built (detr_d2 stand-in for detectron2._C)"
        stand_in.get_cuda_version = lambda: "not built (detr_d2 stand-in for detectron2._C)"
        stand_in.has_cuda = lambda: False
        setattr(stand_in, STUB_MARKER, True)
        return stand_in

    def exec_module(self, module):
        pass


def _install_extension_stand_in():
    """Let an empty ``detectron2._C`` be imported when the compiled extension is missing.

    Works around: v0.6 imports ``detectron2._C`` at module top in ops DETR never uses
    (deform_conv, rotated boxes, fast COCO eval), so ``import detectron2.modeling`` fails
    without it. Unknown names raise AttributeError, which is what ``inspect`` and torch
    expect from a probe; ``collect_env`` gets the two version functions it calls. The
    stand-in is found last, when detectron2 is imported, so detectron2 is not imported here.
    """
    if not any(isinstance(finder, _ExtensionStandIn) for finder in sys.meta_path):
        sys.meta_path.append(_ExtensionStandIn())


def has_compiled_ops():
    """True when detectron2's real C++ extension is importable (fast COCO eval works)."""
    import detectron2._C as ops

    return not getattr(ops, STUB_MARKER, False)


def fill_in_fast_coco_eval(cocoeval_class):
    """Make ``COCOEvaluator(use_fast_impl=True)`` run ``cocoeval_class`` where detectron2's
    compiled COCOeval is missing; a no-op with the real extension.

    Works around: v0.6 from PyPI has no compiled extension, and its ``COCOeval_opt`` (which
    ``coco_evaluation`` looks up by name at each evaluation) calls ``detectron2._C``.
    ``cocoeval_class`` takes pycocotools' ``COCOeval`` arguments (e.g.
    ``detr_d2.evaluation.FasterCOCOeval``).
    """
    if has_compiled_ops():
        return
    from detectron2.evaluation import coco_evaluation

    coco_evaluation.COCOeval_opt = cocoeval_class


def _alias_pillow_linear():
    """Works around: Pillow 10 removed ``Image.LINEAR``, a default argument in v0.6's
    ``data/transforms/transform.py``, so ``import detectron2.data`` fails. The alias is
    the value Pillow itself gave it (BILINEAR); chosen over pinning Pillow<10, which has
    no fixes for the CVEs of the last years."""
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _alias_numpy_scalar_types():
    """Works around: numpy 1.24 removed ``np.bool``/``np.int``/``np.float``/``np.str``, still
    used by v0.6 (``structures/masks.py`` on empty polygons, ``data/build.py`` class
    histogram, the Visualizer, sem-seg and VOC evaluation, ``datasets/pascal_voc.py``
    reading a VOC image set). They were aliases of the builtins."""
    for name, builtin in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name not in np.__dict__:
            setattr(np, name, builtin)


def _cpu_capable_worker(local_rank, main_func, world_size, num_per_machine, machine_rank,
                        dist_url, args, timeout):
    """One process of a ``launch``: gloo when CUDA is absent, NCCL otherwise."""
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    use_cuda = torch.cuda.is_available()
    global_rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(backend="NCCL" if use_cuda else "GLOO", init_method=dist_url,
                            world_size=world_size, rank=global_rank, timeout=timeout)
    for machine in range(world_size // num_per_machine):
        ranks = list(range(machine * num_per_machine, (machine + 1) * num_per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    if use_cuda:
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    main_func(*args)


def _launch_falls_back_to_gloo():
    """detectron2 main (which has ``comm.create_local_process_group``) picks GLOO by itself."""
    from detectron2.utils import comm

    return hasattr(comm, "create_local_process_group")


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None,
           args=()):
    """detectron2's ``launch``, usable on CPU-only machines.

    Works around: v0.6's ``_distributed_worker`` asserts CUDA and hard-codes NCCL, so
    ``--num-gpus 2 MODEL.DEVICE cpu`` cannot start; detectron2 main falls back to GLOO.
    """
    import torch.multiprocessing as mp
    from detectron2.engine import launch as d2_launch
    from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port

    world_size = num_machines * num_gpus_per_machine
    if world_size == 1 or _launch_falls_back_to_gloo():
        return d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logging.getLogger(__name__).warning("file:// is unreliable across machines; use tcp://")
    mp.spawn(_cpu_capable_worker, nprocs=num_gpus_per_machine, daemon=False,
             args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args,
                   DEFAULT_TIMEOUT))


def ddp_device_ids(device):
    """``device_ids`` for DistributedDataParallel: the local GPU, or None on CPU.

    Works around: v0.6's ``create_ddp_model`` always passes ``[local_rank]``, which torch
    rejects for a module on the CPU.
    """
    import torch
    from detectron2.utils import comm

    return [comm.get_local_rank()] if torch.device(device).type == "cuda" else None


# Deprecation warnings that detectron2's dependencies trigger in torch at import time, which
# their users cannot act on: (message regex, category).
DEPENDENCY_DEPRECATIONS = [
    (r"`torch\.jit\.script` is deprecated", FutureWarning),  # fvcore.nn.focal_loss, at import
]


def _silence_dependency_deprecations():
    """Works around: fvcore (imported by detectron2.layers) decorates with ``torch.jit.script``,
    which torch deprecates (a FutureWarning at every import with torch 2.14), so each tool's start
    (even ``--help``) printed it. Only these messages are ignored; the rest still shows."""
    for message, category in DEPENDENCY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)


def apply():
    """Apply every workaround above that the installed versions need (idempotent)."""
    _silence_dependency_deprecations()
    _alias_pillow_linear()
    _alias_numpy_scalar_types()
    _install_extension_stand_in()
