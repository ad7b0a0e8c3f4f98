"""Safe reading and atomic writing of checkpoint files.

``torch.load`` of an arbitrary pickle can run code. Checkpoints are read with
``weights_only=True`` (tensors, plain containers and numbers), plus
``argparse.Namespace``, which the reference DETR's training script stores under "args".
Anything else is refused unless the caller explicitly trusts the file.
"""
import argparse
import os
import pickle
import uuid

import torch

SAFE_EXTRA_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


def load_checkpoint_file(path, trust_pickle=False):
    """Read a torch checkpoint on the CPU; tensors and plain data only unless ``trust_pickle``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the file is truncated; "
                              "use an earlier checkpoint or download/convert it again")
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_EXTRA_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data, which could run "
            f"code when loaded ({str(error).splitlines()[0]}). It was not loaded. If you trust "
            "its source, allow full unpickling explicitly (--trust-pickle)."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint "
                              f"(truncated or corrupt?): {error}") from None


def atomic_write(path, write_fn, binary=True):
    """Call ``write_fn(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    Readers see either the old ``path`` or the complete new one, never a partial file.
    ``write_fn`` gets a file opened in binary mode, or text mode if not ``binary``.
    The file gets the permissions of a plainly created one (the process umask applies).
    """
    tmp_path = os.path.join(os.path.dirname(os.path.abspath(path)),
                            f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp_path, "xb" if binary else "x") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_torch_save(obj, path):
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash mid-write leaves the previous ``path`` (if any) untouched.
    """
    atomic_write(path, lambda file: torch.save(obj, file))
