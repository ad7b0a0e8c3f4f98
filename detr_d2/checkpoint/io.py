"""Safe reading and atomic writing of checkpoint files.

``torch.load`` or ``pickle.load`` of an arbitrary file can run code. Checkpoints are read
with ``weights_only=True`` (tensors, plain containers and numbers), plus
``argparse.Namespace``, which the reference DETR's training script stores under "args";
legacy pickles (detectron2 model-zoo ``.pkl`` files) with an unpickler that only builds
NumPy arrays and plain data. Anything else is refused unless the caller explicitly trusts
the file (``trust_pickle``, the ``--trust-pickle`` flag of the tools).

Files that are not checkpoints at all (text, NumPy ``.npy``, images, truncated files) are
recognised and reported as such, with the file name.
"""
import argparse
import os
import pickle
import pickletools
import re
import uuid
import warnings

import torch

from detr_d2.errors import SetupError

__all__ = ["CheckpointError", "TRUST_PICKLE_HINT", "atomic_torch_save", "atomic_write", "describe_non_checkpoint",
           "load_checkpoint_file", "load_pickle_file", "remove_stale_temporary_files"]

SAFE_EXTRA_GLOBALS = [argparse.Namespace]
TRUST_PICKLE_HINT = ("If you trust its source, --trust-pickle (of tools/train_net.py, demo.py, visualize_attention.py "
                     "and convert_detr_checkpoint.py) loads it with full unpickling, running whatever code it holds.")
# (module, name) of the globals a NumPy-array pickle needs, NumPy 1.x and 2.x spellings;
# protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1").
SAFE_PICKLE_GLOBALS = frozenset(
    [(package + module, name)
     for package in ("numpy.core", "numpy._core")
     for module, name in ((".multiarray", "_reconstruct"), (".multiarray", "scalar"),
                          (".numeric", "_frombuffer"))]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
       ("_codecs", "encode")])
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # see atomic_write


class CheckpointError(SetupError, ValueError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


# ---------------------------------------------------------------- recognising files
def _looks_like_text(head):
    printable = sum(32 <= byte < 127 or byte in b"\t\r\n" for byte in head)
    return bool(head) and printable >= 0.95 * len(head)


def describe_non_checkpoint(path, text_pickles=False):
    """What ``path`` is when it is plainly not a torch checkpoint or pickle, else None.

    Looks at the first bytes only: torch's zip format starts with "PK", pickles of
    protocol 2+ (and torch's legacy format) with the opcode 0x80. Protocol 0/1 pickles
    look like text: with ``text_pickles`` text is not reported (the unpickler decides).
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    kinds = [(b"\x93NUMPY", "a NumPy .npy array file"), (b"\x89HDF", "an HDF5 file"),
             (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image")]
    for magic, kind in kinds:
        if head.startswith(magic):
            return kind
    if _looks_like_text(head):
        return None if text_pickles else "a text file"
    return None if text_pickles else "data in an unknown format"


def _check_is_file(path, text_pickles=False):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the file is truncated; "
                              "use an earlier checkpoint or download/convert it again")
    kind = describe_non_checkpoint(path, text_pickles)
    if kind:
        raise CheckpointError(f"{path} is not a checkpoint: it is {kind}. Give a PyTorch "
                              "checkpoint (.pth) or a detectron2 model-zoo .pkl file.")


_NOT_LOADED = ("that could run code from the file, so it was not loaded (only tensors, NumPy arrays and plain "
               "data are read)")


def _refused(path, global_name):
    """The file holds an object of (or a call of) ``global_name``."""
    reference = ("It looks like a checkpoint of the reference DETR's training script: convert it "
                 "with tools/convert_detr_checkpoint.py. " if global_name == "argparse.Namespace" else "")
    return CheckpointError(f"checkpoint {path} holds a Python object of type {global_name}, which only full "
                           f"unpickling can rebuild: {_NOT_LOADED}. {reference}{TRUST_PICKLE_HINT}")


def _refused_unreadable(path, instruction):
    """The file's pickle uses an ``instruction`` torch's weights-only reader does not run."""
    return CheckpointError(f"checkpoint {path} holds pickled data that only full unpickling can read "
                           f"({instruction}): {_NOT_LOADED}. {TRUST_PICKLE_HINT}")


# What torch's weights-only reader says when it meets something it does not build.
_NAMED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+) whose module")
_OBJECT_STEP = re.compile(r"Can only (?:build|create new object)[^,]*, but got (.+)$|"
                          r"Trying to call reduce for unrecognized function (.+)$", re.MULTILINE)
_OPERAND = re.compile(r"Unsupported operand (\d+)")


def _weights_only_refusal(path, error):
    """The CheckpointError for torch's weights-only reader refusing a file's content (objects,
    functions, or pickle opcodes it does not take); None when ``error`` tells of damage."""
    message = str(error)
    named = _NAMED_GLOBAL.search(message)
    if named:
        return _refused(path, named.group(1) or named.group(2))
    step = _OBJECT_STEP.search(message)
    if step:
        return _refused(path, (step.group(1) or step.group(2)).strip())
    operand = _OPERAND.search(message)
    opcode = pickletools.code2op.get(chr(int(operand.group(1)))) if operand else None
    if opcode is not None:  # a real pickle instruction, which torch's reader does not run
        return _refused_unreadable(path, f"the protocol-{opcode.proto} pickle instruction {opcode.name}")
    return None


def _corrupt(path, error):
    text = str(error).strip()
    first_sentence = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(error).__name__
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({first_sentence}); use an "
                           "earlier checkpoint, or copy/download/convert it again")


# ---------------------------------------------------------------- loading
def load_checkpoint_file(path, trust_pickle=False, allowed_globals=tuple(SAFE_EXTRA_GLOBALS)):
    """Read a torch checkpoint on the CPU; tensors and plain data only unless ``trust_pickle``.

    ``allowed_globals``: classes allowed besides (default: ``argparse.Namespace``, for the
    reference DETR's training checkpoints).

    Raises:
        CheckpointError: missing, empty, not a checkpoint, truncated/corrupt, or (without
            ``trust_pickle``) holding Python objects other than tensors and plain data.
    """
    _check_is_file(path)
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        # torch's warning about a pickle protocol above 2 would repeat what the refusal says.
        with torch.serialization.safe_globals(list(allowed_globals)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise (_weights_only_refusal(path, error) or _corrupt(path, error)) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as error:
        raise _corrupt(path, error) from None


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds NumPy arrays and plain containers, and no other object."""

    def find_class(self, module, name):
        if (module, name) in SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load_pickle_file(path, trust_pickle=False):
    """Unpickle ``path`` (e.g. a detectron2 model-zoo ``.pkl``: a dict of NumPy arrays).

    Without ``trust_pickle`` only NumPy arrays, numbers, strings and plain containers are
    built; any other global (a class or function the pickle names) is refused with a
    CheckpointError naming it. Python-2 pickles are read with latin1 strings, as
    detectron2 does.
    """
    _check_is_file(path, text_pickles=True)
    try:
        with open(path, "rb") as f:
            if trust_pickle:
                return pickle.load(f, encoding="latin1")
            return _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as error:
        refused = re.match(r"refused global (\S+)", str(error))
        if refused:
            raise _refused(path, refused.group(1)) from None
        raise _corrupt(path, error) from None
    except (EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise _corrupt(path, error) from None


# ---------------------------------------------------------------- writing
def atomic_write(path, write_fn, binary=True):
    """Call ``write_fn(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    Readers see either the old ``path`` or the complete new one, never a partial file.
    ``write_fn`` gets a file opened in binary mode, or text mode if not ``binary``.
    The file gets the permissions of a plainly created one (the process umask applies).
    The temporary file is ``.<name>.<pid>.<8 hex>.tmp``; a process killed while writing
    leaves it behind (see ``remove_stale_temporary_files``).
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


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporary_files(folder):
    """Delete the temporary files that killed writers left in ``folder``; their names.

    Only files named as ``atomic_write`` names them, whose writing process (by the pid in
    the name) no longer runs on this machine, are removed.
    """
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _TEMP_NAME.match(name)
        if match and int(match.group(1)) != os.getpid() and not _process_exists(int(match.group(1))):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed
