"""A training job killed with SIGKILL (the OOM killer, a pre-empted node, kill -9) loses at
most the iterations since its last checkpoint: ``--resume`` continues from the last
complete checkpoint, also when the kill came while a checkpoint was being written.

Real tools/train_net.py subprocesses on tests/conftest.py's data, configs/tests/tiny.yaml.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from detr_d2.engine import AtomicDetectionCheckpointer
from tests.helpers import REPO, assert_succeeded, run_one, subprocess_env, tiny_model, train_net

MAX_ITER = 16
OPTS = ["SOLVER.MAX_ITER", MAX_ITER, "SOLVER.CHECKPOINT_PERIOD", 4, "DATASETS.TEST", "()"]

# Runs tools/train_net.py (argv[1:]) in this process with torch.save replaced by one that,
# at its second call, writes the first half of the real bytes into the file it was given
# and then SIGKILLs the process: a kill in the middle of writing a checkpoint. What is
# under test is the checkpointer's atomic write around torch.save, not torch.save.
KILL_WHILE_SAVING = """
import io, os, runpy, signal, sys
import torch
real_save = torch.save
calls = []

def save_half_then_die(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) < 2:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_half_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def load_tiny(path):
    """Load ``path`` into the tiny model (every tensor must fit); its raw dict."""
    AtomicDetectionCheckpointer(tiny_model("MODEL.DETR.NUM_CLASSES", 80)).load_for_inference(str(path))
    return torch.load(path, weights_only=True)


def start_and_kill_after_first_checkpoint(command, output_dir, datasets_root, timeout=600):
    """Start ``python COMMAND``, SIGKILL it as soon as ``last_checkpoint`` appears; its
    exit status and the checkpoint name ``last_checkpoint`` held at the kill."""
    process = subprocess.Popen([sys.executable, *map(str, command)], cwd=REPO,
                               env=subprocess_env(datasets_root), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    last = output_dir / "last_checkpoint"
    deadline = time.monotonic() + timeout
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process.returncode, last.read_text() if last.exists() else None


def assert_resumes_to_the_end(datasets_root, output_dir, first_iteration):
    """``--resume`` with the same arguments starts at ``first_iteration`` and finishes."""
    run = run_one(train_net("--resume", "OUTPUT_DIR", output_dir, *OPTS), datasets_root)
    assert_succeeded(run)
    log = (output_dir / "log.txt").read_text()
    assert f"Starting training from iteration {first_iteration}" in log
    assert (output_dir / "last_checkpoint").read_text() == "model_final.pth"
    assert load_tiny(output_dir / "model_final.pth")["iteration"] == MAX_ITER - 1
    assert not [name for name in os.listdir(output_dir) if name.endswith(".tmp")]
    return run


@pytest.mark.slow
def test_sigkill_during_training_then_resume_continues_from_last_checkpoint(datasets_root, tmp_path):
    output_dir = tmp_path / "out"
    command = train_net("OUTPUT_DIR", output_dir, *OPTS)
    returncode, last = start_and_kill_after_first_checkpoint(command, output_dir, datasets_root)

    assert returncode == -signal.SIGKILL, "the job ended before it could be killed"
    assert last is not None and last != "model_final.pth"
    saved_iteration = load_tiny(output_dir / last)["iteration"]
    assert last == f"model_{saved_iteration:07d}.pth"
    assert_resumes_to_the_end(datasets_root, output_dir, saved_iteration + 1)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(datasets_root, tmp_path):
    output_dir = tmp_path / "out"
    run = run_one(["-c", KILL_WHILE_SAVING, REPO / "tools" / "train_net.py", "--config-file",
                   REPO / "configs" / "tests" / "tiny.yaml", "OUTPUT_DIR", output_dir, *OPTS],
                  datasets_root)

    assert run.returncode == -signal.SIGKILL, run.output[-3000:]
    assert "Saving checkpoint to" in run.output and "model_0000007.pth" in run.output
    names = sorted(os.listdir(output_dir))
    partial = [name for name in names if name.startswith(".model_0000007.pth.") and name.endswith(".tmp")]
    assert len(partial) == 1 and (output_dir / partial[0]).stat().st_size > 0, names
    assert "model_0000007.pth" not in names, "a partial checkpoint sits under its final name"
    assert (output_dir / "last_checkpoint").read_text() == "model_0000003.pth"
    assert load_tiny(output_dir / "model_0000003.pth")["iteration"] == 3

    resumed = assert_resumes_to_the_end(datasets_root, output_dir, 4)
    assert f"Removed 1 unfinished checkpoint file(s) of an interrupted run from {output_dir}: {partial[0]}" \
        in resumed.output
