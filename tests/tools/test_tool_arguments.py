"""Every tool that reads a config takes its overrides in both of detectron2's spellings
(positional, after ``--opts``, and both combined), and its other flags as before;
tools/analyze_model.py runs without --input-size (the config's test size)."""
import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY_CONFIG, TOOLS

# Each config tool with arguments its parser requires besides the overrides.
REQUIRED = {
    "analyze_model.py": ["--config-file", "c.yaml"],
    "benchmark.py": ["--config-file", "c.yaml", "--task", "eval"],
    "benchmark_export.py": ["--config-file", "c.yaml"],
    "convert_detr_checkpoint.py": ["--source", "in.pth", "--output", "out.pth"],
    "demo.py": ["--config-file", "c.yaml", "--input", "a.png", "--output", "out"],
    "export_model.py": ["--config-file", "c.yaml", "--format", "onnx", "--output", "out"],
    "pretrain_backbone.py": ["--dataset-dir", "data"],
    "run_demo.py": [],
    "sweep_panoptic_threshold.py": ["--config-file", "c.yaml", "--dataset", "val"],
    "train_net.py": ["--config-file", "c.yaml", "--eval-only"],
    "visualize_attention.py": ["--config-file", "c.yaml", "--input", "a.png", "--output", "out"],
    "visualize_data.py": ["--config-file", "c.yaml", "--source", "annotation", "--output-dir", "out"],
}
FORMS = {
    "positional": ["MODEL.DEVICE", "cpu", "SEED", "3"],
    "--opts": ["--opts", "MODEL.DEVICE", "cpu", "SEED", "3"],
    "both": ["MODEL.DEVICE", "cpu", "--opts", "SEED", "3"],
}


def tool_parser(tool):
    """``build_parser()`` of tools/<tool>, imported from its file."""
    spec = importlib.util.spec_from_file_location(f"tool_{tool[:-3]}", TOOLS / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_every_tool_with_a_config_is_listed():
    with_config = {path.name for path in TOOLS.glob("*.py") if "--config-file" in tool_parser(path.name).format_usage()}
    assert with_config == set(REQUIRED)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("tool", list(REQUIRED))
def test_overrides_in_both_spellings(tool, form):
    parser = tool_parser(tool)
    args = parser.parse_args([*REQUIRED[tool], *FORMS[form]])
    assert args.opts == ["MODEL.DEVICE", "cpu", "SEED", "3"]
    assert parser.parse_args(REQUIRED[tool]).opts == []


def test_other_flags_still_parse_before_the_overrides():
    args = tool_parser("demo.py").parse_args(["--config-file", "c.yaml", "--input", "a.png", "b.png", "--output", "o",
                                              "--confidence-threshold", "0.3", "--trust-pickle", "--opts", "SEED", "1"])
    assert (args.input, args.confidence_threshold, args.trust_pickle, args.opts) == (["a.png", "b.png"], 0.3, True,
                                                                                     ["SEED", "1"])
    args = tool_parser("train_net.py").parse_args(["--config-file", "c.yaml", "--num-gpus", "2", "--resume",
                                                   "SEED", "1"])
    assert (args.num_gpus, args.resume, args.trust_pickle, args.opts) == (2, True, False, ["SEED", "1"])


def run_analyze_model(*args):
    return subprocess.Popen([sys.executable, str(TOOLS / "analyze_model.py"), "--config-file", str(TINY_CONFIG),
                             *map(str, args)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_analyze_model_reads_overrides_both_ways_and_defaults_to_the_test_size(tmp_path):
    """tiny.yaml tests at 128 px: a 640x480 image becomes 96x128. 12 queries instead of 10
    add 2 x 64 query-embedding parameters, whichever way they are given."""
    runs = {"default": run_analyze_model("--json", tmp_path / "default.json", "MODEL.DETR.NUM_CLASSES", 3),
            "positional": run_analyze_model("--json", tmp_path / "positional.json", "MODEL.DETR.NUM_CLASSES", 3,
                                            "MODEL.DETR.NUM_OBJECT_QUERIES", 12),
            "--opts": run_analyze_model("--json", tmp_path / "opts.json", "--opts", "MODEL.DETR.NUM_CLASSES", 3,
                                        "MODEL.DETR.NUM_OBJECT_QUERIES", 12)}
    for name, process in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {stdout}{stderr}"
    reports = {name: json.loads((tmp_path / f"{name.strip('-')}.json").read_text()) for name in runs}
    assert reports["default"]["input_size"] == [96, 128]
    queries_added = reports["default"]["parameters"] + 2 * 64
    assert reports["positional"]["parameters"] == reports["--opts"]["parameters"] == queries_added
