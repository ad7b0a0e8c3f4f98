"""Checkpoints that only full unpickling can read are refused for what they are, not as damaged.

Two crafted files whose loading would create a marker file: one calls ``os.open`` (a
function of a module torch's weights-only reader blocks outright), one is written with
pickle protocol 4 (whose FRAME instruction that reader does not run). Each is refused by
the converter, train_net and the demo with the message that the file holds what only full
unpickling can rebuild, that this could run code from the file, and that --trust-pickle
loads it if its source is trusted; the marker never appears. A damaged file is still
reported as truncated or corrupt.
"""
import os

import pytest
import torch

from detr_d2.checkpoint.io import CheckpointError, load_checkpoint_file
from tests.helpers import TINY_CONFIG, TOOLS, assert_one_line_error, run_concurrently, tiny_model, train_net

CLASSES = ("MODEL.DETR.NUM_CLASSES", 80)
MESSAGE_PARTS = ("only full unpickling can", "could run code from the file", "was not loaded",
                 "If you trust its source, --trust-pickle")
KINDS = {  # kind: (a phrase of its refusal, the pickle protocol it is written with)
    "blocked_function": ("holds a Python object of type posix.open", 2),
    "protocol_4": ("the protocol-4 pickle instruction FRAME", 4),
}


class OpensFileWhenLoaded:
    """Unpickles as ``os.open(path, O_CREAT | O_WRONLY)``: loading it creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.open, (self.path, os.O_CREAT | os.O_WRONLY)


class CreatesFileWhenLoaded:
    """Unpickles as ``open(path, "w")``: loading it creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_model(*CLASSES).state_dict()


def crafted(folder, kind, name, weights):
    """(path, marker) of tiny weights plus an object of ``kind`` that would create ``marker``."""
    marker = folder / f"{name}.marker"
    payload = OpensFileWhenLoaded(marker) if kind == "blocked_function" else CreatesFileWhenLoaded(marker)
    path = folder / f"{name}.pth"
    torch.save({"model": weights, "note": payload}, path, pickle_protocol=KINDS[kind][1])
    return path, marker


def assert_refusal_says_what_it_is(message, path, kind):
    assert str(path) in message and KINDS[kind][0] in message, message
    for part in MESSAGE_PARTS:
        assert part in message, message
    assert "corrupt" not in message and "truncated" not in message, message


@pytest.mark.parametrize("kind", list(KINDS))
def test_refused_in_process_for_what_it_is(kind, weights, tmp_path):
    path, marker = crafted(tmp_path, kind, kind, weights)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(str(path))
    assert_refusal_says_what_it_is(str(error.value), path, kind)
    assert not marker.exists()


def test_protocol_4_weights_load_with_trust_and_damage_is_still_corrupt(weights, tmp_path):
    path = tmp_path / "protocol4.pth"
    torch.save({"model": weights}, path, pickle_protocol=4)
    loaded = load_checkpoint_file(str(path), trust_pickle=True)["model"]
    torch.testing.assert_close(loaded, dict(weights), rtol=0, atol=0)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is truncated or corrupt"):
        load_checkpoint_file(str(damaged))


@pytest.fixture(scope="module")
def cli(weights, datasets_root, tmp_path_factory):
    """{(tool, kind): (Run, checkpoint, marker)} of the converter, train_net and the demo on
    each kind of file, run at once."""
    root = tmp_path_factory.mktemp("unpickling_cli")
    image = datasets_root / "coco" / "val2017" / "000001.png"
    commands, cases = [], []
    for kind in KINDS:
        for tool in ("convert", "train_net", "demo"):
            path, marker = crafted(root, kind, f"{tool}_{kind}", weights)
            output = root / f"{tool}_{kind}_output"
            commands.append({
                "convert": [TOOLS / "convert_detr_checkpoint.py", "--source", path, "--output", f"{output}.pth"],
                "train_net": train_net("--eval-only", "OUTPUT_DIR", output, "MODEL.WEIGHTS", path, *CLASSES),
                "demo": [TOOLS / "demo.py", "--config-file", TINY_CONFIG, "--input", image, "--output", output,
                         "--opts", "MODEL.WEIGHTS", path, *CLASSES],
            }[tool])
            cases.append(((tool, kind), path, marker))
    runs = run_concurrently(commands, datasets_root)
    return {case: (run, path, marker) for (case, path, marker), run in zip(cases, runs)}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("tool", ["convert", "train_net", "demo"])
def test_tools_refuse_it_saying_what_it_is_and_never_run_it(cli, tool, kind):
    run, path, marker = cli[(tool, kind)]
    assert not marker.exists(), f"loading {path} ran its code"
    if tool == "convert":
        assert run.returncode == 2 and "Traceback" not in run.output, run.output[-3000:]
        line = run.stderr.strip().splitlines()[-1]
    else:
        line = assert_one_line_error(run, str(path))
    assert_refusal_says_what_it_is(line, path, kind)
