"""Unusable and malicious checkpoint files.

* Bad files (truncated, empty, text, NumPy .npy, a bare tensor, non-tensor values, another
  model's weights) give one SetupError naming the file and what to do, for evaluation /
  drawing (``load_inference_weights``, ``--eval-only``, tools/demo.py) and for training
  (``MODEL.WEIGHTS``); partial weights still start a training, whose log lists what was
  skipped.
* A pickle whose loading would run code (here: create a marker file) is refused through
  every door (MODEL.WEIGHTS for training and --eval-only, --resume, the converter, the
  demo; .pth and detectron2 .pkl files), and the marker never appears. ``--trust-pickle``
  is the explicit opt-in: with it a legacy .pkl holding other Python objects loads.
"""
import datetime
import pickle

import numpy as np
import pytest
import torch
import torchvision

from detr_d2.engine import AtomicDetectionCheckpointer, SetupError
from detr_d2.utils.predictor import load_inference_weights
from tests.helpers import (
    TOOLS,
    assert_one_line_error,
    assert_succeeded,
    run_concurrently,
    save_weights,
    tiny_model,
    train_net,
    trains_in_subprocess,
)

CLASSES = ("MODEL.DETR.NUM_CLASSES", 80)  # tiny.yaml's data: the 80 COCO classes


class CreatesFileWhenLoaded:
    """Pickles as a call of ``open(path, "w")``: unpickling it creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def numpy_state(model):
    return {key: value.numpy() for key, value in model.state_dict().items()}


def write_pickle(path, data):
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths of the checkpoint files of the tests, keyed by kind; "markers" the folder of
    the files the malicious ones would create."""
    root = tmp_path_factory.mktemp("checkpoints")
    model = tiny_model(*CLASSES)
    good = save_weights(model, root / "tiny.pth")
    paths = {"good": good, "markers": root / "markers"}
    paths["markers"].mkdir()
    paths["truncated"] = root / "truncated.pth"
    paths["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    paths["empty"] = root / "empty.pth"
    paths["empty"].write_bytes(b"")
    paths["text"] = root / "notes.pth"
    paths["text"].write_text("model weights are on the shared drive\n")
    paths["npy"] = root / "weights.npy"
    np.save(paths["npy"], np.zeros((3, 3), np.float32))
    paths["tensor"] = root / "tensor.pth"
    torch.save(torch.zeros(3), paths["tensor"])
    paths["settings"] = root / "settings.pth"
    torch.save({"model": {"lr": 0.1}}, paths["settings"])
    paths["classifier"] = root / "resnet18_classifier.pth"
    torch.save(torchvision.models.resnet18().state_dict(), paths["classifier"])
    paths["other_queries"] = save_weights(tiny_model(*CLASSES, "MODEL.DETR.NUM_OBJECT_QUERIES", 12),
                                          root / "queries12.pth")
    state = dict(model.state_dict(), **{"extra_head.weight": torch.zeros(2)})
    del state["class_embed.weight"], state["class_embed.bias"]
    state["query_embed.weight"] = torch.zeros(12, 64)
    paths["partial"] = root / "partial.pth"
    torch.save({"model": state}, paths["partial"])
    paths["zoo_pkl"] = write_pickle(root / "zoo.pkl", {"model": numpy_state(model), "__author__": "test"})
    paths["legacy_pkl"] = write_pickle(root / "legacy.pkl", {"model": numpy_state(model), "__author__": "test",
                                                             "date": datetime.date(2020, 5, 26)})
    return paths


def malicious(files, name, case):
    """Write the tiny weights plus a code-running object to ``name``; (path, its marker)."""
    marker = files["markers"] / case
    payload = {"model": torch.load(files["good"], weights_only=True)["model"],
               "note": CreatesFileWhenLoaded(marker)}
    path = files["good"].parent / name
    if name.endswith(".pkl"):
        payload["model"] = {k: v.numpy() for k, v in payload["model"].items()}
        payload["__author__"] = "someone"
        write_pickle(path, payload)
    else:
        torch.save(payload, path)
    return path, marker


# ---------------------------------------------------------------- in-process: every bad kind
BAD_FILES = {
    "truncated": "is truncated or corrupt",
    "empty": "is empty (0 bytes)",
    "text": "is not a checkpoint: it is a text file",
    "npy": "is not a checkpoint: it is a NumPy .npy array file",
    "tensor": "is not a model checkpoint: it holds a Tensor",
    "settings": "holds a float under 'lr', where a tensor is expected",
    "classifier": "holds no tensor of this model",
}


@pytest.fixture(scope="module")
def model():
    return tiny_model(*CLASSES)


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file_is_refused_for_inference_and_training_naming_it(kind, files, model):
    path = str(files[kind])
    for load in (lambda: load_inference_weights(model, path), lambda: AtomicDetectionCheckpointer(model).load(path)):
        with pytest.raises(SetupError) as error:
            load()
        assert path in str(error.value) and BAD_FILES[kind] in str(error.value)


def test_checkpoint_of_other_shapes_is_refused_for_inference_but_trains(files, model):
    path = str(files["other_queries"])
    with pytest.raises(SetupError, match=r"query_embed.weight \(checkpoint \(12, 64\), model \(10, 64\)\)"):
        load_inference_weights(model, path)
    AtomicDetectionCheckpointer(model).load(path)


def test_detectron2_model_zoo_pkl_of_arrays_loads_without_trust(files, model):
    trained = tiny_model(*CLASSES)
    AtomicDetectionCheckpointer(trained).load_for_inference(str(files["zoo_pkl"]))
    reference = torch.load(files["good"], weights_only=True)["model"]
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)


def test_legacy_pkl_with_other_objects_needs_trust_pickle(files, model):
    with pytest.raises(SetupError, match=r"legacy.pkl holds a Python object of type datetime.date.*--trust-pickle"):
        AtomicDetectionCheckpointer(model).load(str(files["legacy_pkl"]))
    extra = AtomicDetectionCheckpointer(model, trust_pickle=True).load(str(files["legacy_pkl"]))
    assert extra["date"] == datetime.date(2020, 5, 26)


# ---------------------------------------------------------------- the real tools
@pytest.fixture(scope="module")
@trains_in_subprocess
def cli(files, datasets_root, tmp_path_factory):
    """{case: (Run, marker file or None, output path)} of every CLI case, run at once."""
    root = tmp_path_factory.mktemp("checkpoint_cli")
    image = datasets_root / "coco" / "val2017" / "000001.png"
    resume_dir = root / "resume"
    resume_dir.mkdir()
    malicious(files, str(resume_dir / "model_0000009.pth"), "resume")
    (resume_dir / "last_checkpoint").write_text("model_0000009.pth")
    evil = {case: malicious(files, name, case) for case, name in [
        ("train_pth", "evil_train.pth"), ("eval_pth", "evil_eval.pth"), ("convert", "evil_reference.pth"),
        ("demo_pkl", "evil_demo.pkl")]}
    evil["resume"] = (resume_dir / "model_0000009.pth", files["markers"] / "resume")
    train_opts = ["SOLVER.MAX_ITER", 1, "DATASETS.TEST", "()"]

    def demo(weights, case, *flags):
        return [TOOLS / "demo.py", "--config-file", TOOLS.parent / "configs/tests/tiny.yaml", *flags,
                "--input", image, "--output", root / case, "--opts", "MODEL.WEIGHTS", weights, *CLASSES]

    commands = {
        "eval_truncated": train_net("--eval-only", "OUTPUT_DIR", root / "a", "MODEL.WEIGHTS", files["truncated"]),
        "demo_npy": demo(files["npy"], "demo_npy"),
        "train_partial": train_net("OUTPUT_DIR", root / "partial", "MODEL.WEIGHTS", files["partial"], *train_opts),
        "train_pth": train_net("OUTPUT_DIR", root / "c", "MODEL.WEIGHTS", evil["train_pth"][0], *train_opts),
        "eval_pth": train_net("--eval-only", "OUTPUT_DIR", root / "d", "MODEL.WEIGHTS", evil["eval_pth"][0]),
        "resume": train_net("--resume", "OUTPUT_DIR", resume_dir, *train_opts),
        "convert": [TOOLS / "convert_detr_checkpoint.py", "--source", evil["convert"][0],
                    "--output", root / "converted.pth"],
        "demo_pkl": demo(evil["demo_pkl"][0], "demo_pkl"),
        "eval_trusted_legacy_pkl": train_net("--eval-only", "--trust-pickle", "OUTPUT_DIR", root / "f",
                                             "MODEL.WEIGHTS", files["legacy_pkl"]),
    }
    runs = dict(zip(commands, run_concurrently(list(commands.values()), datasets_root)))
    return {"runs": runs, "evil": evil, "root": root}


@pytest.mark.parametrize("case, weights, fragment, exit_code", [
    ("eval_truncated", "truncated", "is truncated or corrupt", 1),
    ("demo_npy", "npy", "is not a checkpoint: it is a NumPy .npy array file", 2),
])
def test_bad_checkpoint_for_eval_and_demo_is_one_line(cli, files, case, weights, fragment, exit_code):
    """The CLI end of the SetupErrors above (every kind reaches it the same way)."""
    assert_one_line_error(cli["runs"][case], str(files[weights]), fragment, exit_code=exit_code)


def test_partial_weights_train_and_the_log_lists_what_was_skipped(cli):
    run = cli["runs"]["train_partial"]
    assert_succeeded(run)
    log = (cli["root"] / "partial" / "log.txt").read_text()
    assert "Skip loading parameter 'query_embed.weight'" in log
    assert "not found in the checkpoint" in log and "class_embed" in log
    assert "not used by the model" in log and "extra_head" in log
    assert (cli["root"] / "partial" / "model_final.pth").exists()


@pytest.mark.parametrize("case", ["train_pth", "eval_pth", "resume", "convert", "demo_pkl"])
def test_code_in_a_checkpoint_never_runs(cli, case):
    path, marker = cli["evil"][case]
    run = cli["runs"][case]
    assert not marker.exists(), f"loading {path} ran its code"
    if case == "convert":
        assert run.returncode == 2 and "Traceback" not in run.output
        line = run.stderr.strip().splitlines()[-1]
        assert str(path) in line and "io.open" in line and "--trust-pickle" in line
        assert not (cli["root"] / "converted.pth").exists()
    else:
        assert_one_line_error(run, str(path), "holds a Python object of type io.open",
                              "could run code", "--trust-pickle")


def test_trusted_legacy_pkl_loads_with_the_opt_in_flag(cli):
    run = cli["runs"]["eval_trusted_legacy_pkl"]
    assert_succeeded(run)
    assert "Evaluation results for bbox" in run.output
