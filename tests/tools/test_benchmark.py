"""tools/benchmark.py on the tiny test configs (DETR; DeformableDetr and Dino): every task
reports its timings, --compare-plain the ratio (and for eval, outputs equal to the plain
path)."""
import importlib.util
import re

import pytest

from tests.helpers import REPO, TINY_CONFIG, run_python

BENCHMARK = REPO / "tools" / "benchmark.py"
MEDIAN = re.compile(r"^ *(fast|plain|data): median ([0-9.]+) s/iter", re.MULTILINE)
COMMON = ["--config-file", str(TINY_CONFIG), "--iters", "2", "--warmup", "1"]
# configs/tests/tiny_deformable.yaml's overrides per meta-architecture
MULTI_SCALE_MODELS = {"DeformableDetr": [], "Dino": ["MODEL.META_ARCHITECTURE", "Dino", "MODEL.DINO.DN_NUMBER", "4"]}


@pytest.fixture(scope="module")
def benchmark():
    """tools/benchmark.py as a module (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark_tool", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(benchmark, capsys, *args):
    assert benchmark.main([*COMMON, *args]) == 0
    return capsys.readouterr().out


def medians(output):
    return {name: float(value) for name, value in MEDIAN.findall(output)}


def test_train_on_synthetic_images_compares_with_the_plain_path(benchmark, capsys):
    output = run_in_process(benchmark, capsys, "--task", "train", "--input-size", "64x80", "--compare-plain")
    assert set(medians(output)) == {"fast", "plain"}
    assert "2 synthetic image(s) of 64x80, 5 boxes each" in output
    assert re.search(r"matcher [0-9.]+% of the iteration", output)
    assert re.search(r"peak RSS [0-9.]+ GiB", output)
    assert "ratio fast/plain:" in output


def test_eval_outputs_equal_the_plain_path(benchmark, capsys):
    output = run_in_process(benchmark, capsys, "--task", "eval", "--input-size", "64x80", "--compare-plain")
    score, box = map(float, re.search(r"score ([0-9.e+-]+), box / image side ([0-9.e+-]+)", output).groups())
    assert score <= 1e-5 and box <= 1e-5


@pytest.mark.parametrize("model", list(MULTI_SCALE_MODELS))
def test_multi_scale_models_run_both_tasks_and_their_fast_paths_give_the_plain_outputs(benchmark, capsys, model):
    """The tiny multi-scale config as DeformableDetr and as Dino (sigmoid top-k outputs,
    deformable attention, multi-level backbone; Dino: query selection, denoising queries in
    training): eval's fast and plain outputs agree, training times its iterations."""
    arguments = ["--config-file", str(REPO / "configs" / "tests" / "tiny_deformable.yaml"), "--iters", "1",
                 "--warmup", "0", "--input-size", "64x80", "--compare-plain", "--precision", "float32"]
    assert benchmark.main([*arguments, "--task", "eval", *MULTI_SCALE_MODELS[model]]) == 0
    output = capsys.readouterr().out
    assert set(medians(output)) == {"fast", "plain"}
    score, box = map(float, re.search(r"score ([0-9.e+-]+), box / image side ([0-9.e+-]+)", output).groups())
    assert score <= 1e-5 and box <= 1e-5
    assert benchmark.main([*arguments, "--task", "train", *MULTI_SCALE_MODELS[model]]) == 0
    assert set(medians(capsys.readouterr().out)) == {"fast", "plain"}


def test_compare_plain_is_refused_for_data(benchmark, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main([*COMMON, "--task", "data", "--compare-plain"])
    assert exit_info.value.code == 2 and "--compare-plain" in capsys.readouterr().err


def test_data_and_train_on_the_config_datasets(datasets_root):
    """A subprocess: the COCO-layout test data is found through $DETECTRON2_DATASETS."""
    for task, variant in (("data", "data"), ("train", "fast")):
        result = run_python([BENCHMARK, *COMMON, "--task", task, "SOLVER.IMS_PER_BATCH", "1"], datasets_root)
        assert result.returncode == 0, result.stderr
        assert set(medians(result.stdout)) == {variant}


def test_mixed_precision_is_timed_beside_float32(benchmark, capsys):
    output = run_in_process(benchmark, capsys, "--task", "eval", "--input-size", "64x80")
    assert re.search(r"^ *fast: median [0-9.]+ s/iter", output, re.MULTILINE)
    assert re.search(r"^ *fast bf16: median [0-9.]+ s/iter", output, re.MULTILINE)
    assert "ratio fast bf16/fast:" in output
    score, box = map(float, re.search(r"largest difference fast bf16 vs fast: score ([0-9.e+-]+), "
                                      r"box / image side ([0-9.e+-]+)", output).groups())
    assert 0 < score < 0.05 and box < 0.05  # bf16 differs from fp32, a little
    only_amp = run_in_process(benchmark, capsys, "--task", "train", "--input-size", "64x80", "--precision", "amp")
    assert re.findall(r"^ *(\S+(?: bf16)?): median", only_amp, re.MULTILINE) == ["fast bf16"]
