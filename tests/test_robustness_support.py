"""Helpers shared by the tests/test_robustness_*.py files (this file holds no test).

The robustness tests run the real command-line tools in subprocesses. Most of those runs
end in an error message after a few seconds of imports, so independent runs are started
together (``run_concurrently``) instead of one after the other.
"""
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

import detr_d2  # noqa: F401  (compat fixes before detectron2)
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from detr_d2 import add_detr_config
from detr_d2.engine import merge_config
from tests.conftest import REPO_ROOT, TINY_CONFIG, subprocess_env

TOOLS = REPO_ROOT / "tools"


@dataclass
class Run:
    """The outcome of one subprocess: exit status, output, wall time until it ended."""

    args: list
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self):
        return self.stdout + self.stderr


def run_concurrently(commands, datasets_root, timeout=600):
    """Start ``python ARGS`` for every argument list of ``commands`` at once (from the
    repository root, the test data as $DETECTRON2_DATASETS); their ``Run``s, in order.

    Output goes to temporary files, so that no process waits on a full pipe.
    """
    env = subprocess_env(datasets_root)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        processes = []
        for index, args in enumerate(commands):
            out = open(os.path.join(folder, f"{index}.out"), "w+")
            err = open(os.path.join(folder, f"{index}.err"), "w+")
            process = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env,
                                       stdout=out, stderr=err, text=True)
            processes.append((args, process, out, err))
        ended = {}
        while len(ended) < len(processes):
            for index, (_, process, _, _) in enumerate(processes):
                if index not in ended and process.poll() is not None:
                    ended[index] = time.monotonic() - started
            if time.monotonic() - started > timeout:
                for _, process, _, _ in processes:
                    process.kill()
                raise TimeoutError(f"subprocesses still running after {timeout} s: {commands}")
            time.sleep(0.05)
        runs = []
        for index, (args, process, out, err) in enumerate(processes):
            out.seek(0), err.seek(0)
            runs.append(Run([str(a) for a in args], process.returncode, out.read(), err.read(),
                            ended[index]))
            out.close(), err.close()
    return runs


def run_one(args, datasets_root, timeout=600):
    """``run_concurrently`` of a single command: its Run."""
    return run_concurrently([args], datasets_root, timeout)[0]


def assert_one_line_error(run, *culprits, exit_code=None):
    """Non-zero exit (``exit_code`` if given); one "ERROR" line naming every culprit; no
    traceback anywhere in the output. Returns that line."""
    output = run.output
    assert run.returncode != 0, output[-3000:]
    if exit_code is not None:
        assert run.returncode == exit_code, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    lines = [line for line in output.splitlines() if "ERROR" in line and all(c in line for c in culprits)]
    assert lines, f"no ERROR line names all of {culprits}:\n{output[-3000:]}"
    return lines[-1]


def assert_succeeded(run):
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


def tiny_cfg(*opts):
    """configs/tests/tiny.yaml with ``KEY VALUE`` overrides (not frozen, datasets not loaded)."""
    return merge_config(add_detr_config(get_cfg()), str(TINY_CONFIG), [str(o) for o in opts])


def tiny_model(*opts):
    """A randomly initialised model of ``tiny_cfg(*opts)`` (seeded), on the CPU."""
    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts))


def save_weights(model, path):
    """Write ``{"model": state_dict}`` of ``model`` to ``path``, as a trained run would."""
    torch.save({"model": model.state_dict()}, path)
    return path


def train_net(*args):
    """Argument list running tools/train_net.py on configs/tests/tiny.yaml with ``args``."""
    return [TOOLS / "train_net.py", "--config-file", TINY_CONFIG, *args]
