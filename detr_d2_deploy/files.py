"""Atomic file writes: a temporary file beside the target, renamed over it when complete,
so a file under its final name is always whole."""
import contextlib
import os
import uuid

__all__ = ["atomic_write", "written_atomically"]


def _temporary_path(path):
    """``.<name>.<pid>.<8 hex>.tmp`` beside ``path`` (the pattern detr_d2's checkpoint
    writer uses too)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def written_atomically(path):
    """Yield a temporary path to write to; on success it is renamed to ``path``, on an
    exception removed."""
    temporary = _temporary_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_write(path, write_fn, binary=True):
    """Call ``write_fn(file)`` on a new temporary file (binary or text mode), flush it to
    disk, then rename it to ``path``."""
    with written_atomically(path) as temporary:
        with open(temporary, "wb" if binary else "w") as file:
            write_fn(file)
            file.flush()
            os.fsync(file.fileno())
