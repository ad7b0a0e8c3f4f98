"""Config mistakes are reported by tools/train_net.py before any heavy work: one line
naming the key and value and what to do, non-zero exit, no model or data loader built.

All cases run as real CLI subprocesses, started together (see run_concurrently).
"""
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, run_concurrently, train_net

# id: (extra args (flags first, then KEY VALUE pairs), strings the error line must name)
CASES = {
    "unknown_key": (["MODEL.DETR.NUM_QUERIES", 5],
                    ["MODEL.DETR.NUM_QUERIES", "Did you mean MODEL.DETR.NUM_OBJECT_QUERIES"]),
    "float_given_text": (["SOLVER.BASE_LR", "abc"],
                         ["SOLVER.BASE_LR must be a number", "gives abc", "e.g. SOLVER.BASE_LR 0.001"]),
    "int_given_float": (["MODEL.DETR.NUM_OBJECT_QUERIES", 1.5],
                        ["MODEL.DETR.NUM_OBJECT_QUERIES must be an integer", "gives 1.5"]),
    "zero_classes": (["MODEL.DETR.NUM_CLASSES", 0],
                     ["MODEL.DETR.NUM_CLASSES is 0 but must be a positive integer", "remove the key"]),
    "negative_classes": (["MODEL.DETR.NUM_CLASSES", -3],
                         ["MODEL.DETR.NUM_CLASSES is -3 but must be a positive integer"]),
    "heads_do_not_divide": (["MODEL.DETR.HIDDEN_DIM", 250, "MODEL.DETR.NHEADS", 8],
                            ["MODEL.DETR.HIDDEN_DIM is 250", "divisible by MODEL.DETR.NHEADS (8)",
                             "e.g. MODEL.DETR.HIDDEN_DIM 248"]),
    "frozen_weights_without_masks": (["MODEL.DETR.FROZEN_WEIGHTS", "box_model.pth"],
                                     ["MODEL.DETR.FROZEN_WEIGHTS is 'box_model.pth' but must be empty without "
                                      "MODEL.MASK_ON", "add MODEL.MASK_ON True", "MODEL.WEIGHTS"]),
    "mask_head_hidden_dim": (["MODEL.MASK_ON", "True"],
                             ["MODEL.DETR.HIDDEN_DIM is 64 but must be usable by the mask head",
                              "e.g. MODEL.DETR.HIDDEN_DIM 256"]),
    "no_training_set": (["DATASETS.TRAIN", "()"],
                        ["DATASETS.TRAIN is empty", "name the registered dataset(s) to train on"]),
    "output_dir_under_a_file": (["OUTPUT_DIR", "{file}/run"],
                                ["OUTPUT_DIR {file}/run cannot be written", "Not a directory",
                                 "choose another OUTPUT_DIR"]),
}
HEAVY_WORK_MARKS = ("Running with full config", "Model:", "Starting training", "Loading from")


@pytest.fixture(scope="module")
def config_error_runs(datasets_root, tmp_path_factory):
    """{case id: (Run, its OUTPUT_DIR, the strings its error must name)}, all run at once."""
    root = tmp_path_factory.mktemp("config_errors")
    a_file = root / "a_file"
    a_file.write_text("a regular file, not a folder\n")
    cases = {}
    for case, (args, culprits) in CASES.items():
        args = [str(a).format(file=a_file) for a in args]
        if "OUTPUT_DIR" not in args:
            args = ["OUTPUT_DIR", root / case, *args]
        output_dir = Path(args[args.index("OUTPUT_DIR") + 1])
        cases[case] = (train_net(*args), output_dir, [c.format(file=a_file) for c in culprits])
    runs = run_concurrently([command for command, _, _ in cases.values()], datasets_root)
    return {case: (run, output_dir, culprits)
            for (case, (_, output_dir, culprits)), run in zip(cases.items(), runs)}


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_is_one_line_before_any_heavy_work(case, config_error_runs):
    run, output_dir, culprits = config_error_runs[case]
    assert_one_line_error(run, *culprits)
    for mark in HEAVY_WORK_MARKS:
        assert mark not in run.output, f"{mark!r}: work started before the error\n{run.output[-3000:]}"
    if case != "output_dir_under_a_file":
        assert not output_dir.exists(), "OUTPUT_DIR was created before the error"
