"""Each workaround in detr_d2.compat: the failure it prevents, and that it is gone with it.

The "without detr_d2" halves run in a fresh interpreter and are skipped where the installed
detectron2 (e.g. its main branch with the C++ extension) does not have the problem.
"""
import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from detr_d2 import compat


def run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def assert_fails_without_plugin(code, expected_error):
    """Show the failure on the installed stack, or skip where this stack never had it."""
    result = run_python(code)
    if result.returncode == 0:
        pytest.skip("the installed detectron2/numpy/Pillow do not have this problem")
    assert expected_error in result.stderr, result.stderr[-2000:]


def test_missing_extension_breaks_modeling_import_and_stand_in_fixes_it():
    assert_fails_without_plugin("import detectron2.modeling", "_C")
    assert run_python("import detr_d2, detectron2.modeling").returncode == 0


def test_stand_in_raises_attribute_error_for_unknown_names():
    import detectron2._C as ops

    if compat.has_compiled_ops():
        pytest.skip("the real detectron2 extension is installed")
    with pytest.raises(AttributeError, match="compiled op"):
        ops.nms_rotated  # noqa: B018 (attribute access is the test)
    assert not hasattr(ops, "__wrapped__")


def test_collect_env_runs_with_the_stand_in():
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()


def test_pillow_linear_alias():
    assert_fails_without_plugin("import detectron2.data", "LINEAR")
    result = run_python("""
        import detr_d2
        from detectron2.data.transforms import ExtentTransform
        import numpy as np
        out = ExtentTransform((0, 0, 4, 4), (2, 2)).apply_image(np.zeros((4, 4, 3), np.uint8))
        assert out.shape == (2, 2, 3)
    """)
    assert result.returncode == 0, result.stderr


def test_numpy_scalar_aliases_make_empty_polygons_work():
    assert_fails_without_plugin("""
        import numpy as np
        np.zeros(2).astype(np.bool)
        np.zeros(2, dtype=np.int)
        np.zeros(2, dtype=np.str)
    """, "has no attribute")
    from detectron2.structures.masks import polygons_to_bitmask

    assert polygons_to_bitmask([], 3, 4).shape == (3, 4)
    assert np.loadtxt(io.StringIO("000001\n000002\n"), dtype=np.str).tolist() == ["000001", "000002"]  # VOC


def test_ddp_device_ids_are_none_on_cpu():
    assert compat.ddp_device_ids("cpu") is None


def _write_rank(output_dir):
    import torch.distributed as dist

    (output_dir / f"rank{dist.get_rank()}-{dist.get_backend()}").write_text("ok")


def test_launch_runs_two_cpu_processes_over_gloo(tmp_path):
    compat.launch(_write_rank, 2, dist_url="auto", args=(tmp_path,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0-gloo", "rank1-gloo"]



def test_fast_coco_eval_fills_in_for_the_missing_compiled_cocoeval():
    """detectron2's COCOeval_opt needs the compiled extension; COCOEvaluator(use_fast_impl=True)
    then runs faster-coco-eval instead, with the official numbers."""
    from detectron2.evaluation import coco_evaluation
    from detectron2.evaluation.fast_eval_api import COCOeval_opt
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from detr_d2.evaluation import FasterCOCOeval
    from detr_d2.evaluation.synthetic_coco import synthetic_detections, synthetic_ground_truth

    if compat.has_compiled_ops():
        pytest.skip("the real detectron2 extension is installed")
    ground_truth = COCO()
    ground_truth.dataset = synthetic_ground_truth(5, num_categories=3)
    ground_truth.createIndex()
    detections = ground_truth.loadRes(synthetic_detections(ground_truth.dataset, per_image=10))
    with pytest.raises(AttributeError, match="compiled op"):
        COCOeval_opt(ground_truth, detections, "bbox").evaluate()
    compat.fill_in_fast_coco_eval(FasterCOCOeval)
    assert coco_evaluation.COCOeval_opt is FasterCOCOeval
    stats = []
    for cocoeval_class in (FasterCOCOeval, COCOeval):
        evaluation = cocoeval_class(ground_truth, detections, "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
        stats.append(evaluation.stats[:12])
    np.testing.assert_allclose(stats[0], stats[1], rtol=0, atol=1e-12)


def test_dependency_deprecations_are_silenced_and_others_still_show():
    """fvcore's torch.jit.script FutureWarning at import is gone; a warning of the same
    category with another message still shows."""
    result = run_python("""
        import warnings
        warnings.simplefilter("default")
        import detr_d2, detectron2.modeling, detectron2.engine
        warnings.warn("still shown", FutureWarning)
    """)
    assert result.returncode == 0, result.stderr
    assert "jit.script" not in result.stderr and "FutureWarning: still shown" in result.stderr
