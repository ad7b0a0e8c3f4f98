"""tools/export_model.py (ONNX and TorchScript, --verify) and tools/predict_onnx.py, run as
real subprocesses on a tiny DETR with random weights (configs/tests/tiny.yaml: COCO class
names and ids from detectron2's builtin metadata). The ONNX predictor runs in a process
where torch, torchvision, detectron2 and detr_d2 cannot be imported, and its
predictions.json is compared with tools/demo.py's on the same images."""
import json
import os

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from detr_d2.engine.build import build_model
from detr_d2.export import ExportableDetr
from detr_d2.export.exporters import load_exported
from detr_d2.export.speed import time_in_turns
from detr_d2.export.verification import compare, example_batch, report_lines, verification_images
from detr_d2_deploy.predictor import onnx_session
from detr_d2_deploy.spec import read_spec
from tests.helpers import (
    TINY_CONFIG,
    TOOLS,
    assert_one_line_error,
    assert_succeeded,
    run_concurrently,
    run_torch_free,
    save_weights,
    tiny_cfg,
    tiny_model,
)

pytestmark = pytest.mark.slow  # the module fixture exports twice and runs the demo: minutes on 2 cores

IMAGE_SIZES = [(150, 211), (233, 171), (97, 131), (61, 87), (300, 299)]  # demo input sizes (h, w)


def export(folder, format, weights, *extra):
    return [TOOLS / "export_model.py", "--config-file", TINY_CONFIG, "--format", format, "--output", folder,
            *extra, "MODEL.WEIGHTS", weights]


def write_inputs(folder):
    """Smooth random images of IMAGE_SIZES (network-input sizes after the 128-px resize
    are not multiples of 32; both orientations) and one unreadable file."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate(IMAGE_SIZES):
        coarse = rng.integers(0, 256, (height // 10 + 2, width // 10 + 2, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(folder / f"image{index}.png")
    (folder / "broken.jpg").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory, datasets_root):
    """{"weights", "onnx": folder, "torchscript": folder, "inputs": folder, "demo": folder}:
    both formats exported with --verify (ONNX on random images with a batch of 3,
    TorchScript on a sample image) and tools/demo.py run (threshold 0, batch 2), at once."""
    root = tmp_path_factory.mktemp("export")
    weights = save_weights(tiny_model(), root / "tiny.pth")
    inputs = write_inputs(root / "inputs")
    runs = run_concurrently([
        export(root / "onnx", "onnx", weights, "--verify", "--batch-size", "3"),
        export(root / "torchscript", "torchscript", weights, "--verify", "--sample-image", inputs / "image1.png"),
        [TOOLS / "demo.py", "--config-file", TINY_CONFIG, "--input", inputs, "--output", root / "demo",
         "--confidence-threshold", "0", "--batch-size", "2", "--opts", "MODEL.WEIGHTS", weights],
    ], datasets_root)
    for run in runs[:2]:
        assert_succeeded(run)
    assert runs[2].returncode == 1, runs[2].output[-3000:]  # broken.jpg is reported and skipped
    return {"weights": weights, "onnx": root / "onnx", "torchscript": root / "torchscript", "inputs": inputs,
            "demo": root / "demo", "logs": {"onnx": runs[0].output, "torchscript": runs[1].output}}


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_export_writes_the_model_and_its_description_and_verifies_it(exports, format):
    spec = read_spec(exports[format])
    description = json.loads((exports[format] / "export.json").read_text())
    assert (exports[format] / spec.model_file).stat().st_size > 1_000_000
    assert [i["name"] for i in description["inputs"]] == ["images", "image_sizes"]
    assert [o["shape"] for o in description["outputs"]] == [["batch", 10, 81], ["batch", 10, 4]]
    assert spec.channel_order == "RGB" and spec.pixel_mean == (123.675, 116.28, 103.53)
    assert (spec.shortest_edge, spec.max_size, spec.score_threshold) == (128, 128, 0.5)
    assert spec.class_names[:2] == ("person", "bicycle") and spec.category_ids[-1] == 90
    verification = description["verification"]
    assert verification["passed"] and len(verification["batches"]) == 4
    batch_sizes = [len(batch["sizes"]) for batch in verification["batches"]]
    assert batch_sizes == [1, 1, 1, 3 if format == "onnx" else 2]
    assert all(b["box"] <= 1e-4 and b["score"] <= 1e-4 and b["label_mismatches"] == 0
               for b in verification["batches"])
    assert "verification passed" in exports["logs"][format]
    assert "max box diff" in exports["logs"][format]


def test_onnx_graph_has_dynamic_batch_and_size_and_no_bool_cumsum(exports):
    model = onnx.load(str(exports["onnx"] / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"images": ["batch", 3, "height", "width"], "image_sizes": ["batch", 2]}
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    cumsum_inputs = [node.input[0] for node in model.graph.node if node.op_type == "CumSum"]
    assert cumsum_inputs and all(types[name] == onnx.TensorProto.FLOAT for name in cumsum_inputs)


def test_onnx_padding_mask_comes_from_the_sizes_input(exports):
    """The same padded tensor with two different unpadded sizes: the graph follows the sizes
    as the eager adapter does (the mask is not a constant of the export). With 90 rows and
    a stride of 32 the feature mask samples pixel rows 0, 30 and 60: size 40 masks the last."""
    model = tiny_model()
    model.load_state_dict(torch.load(exports["weights"], weights_only=True)["model"])
    adapter = ExportableDetr(model.eval())
    run = load_exported("onnx", str(exports["onnx"] / "model.onnx"))
    images, _ = example_batch(verification_images([(90, 120)], seed=7), read_spec(exports["onnx"]))
    images[:, :, 40:, :] = 0  # the bottom rows as padding
    outputs = {}
    for sizes in ([[90, 120]], [[40, 120]]):
        logits, boxes = run(images.numpy(), np.array(sizes, dtype=np.int64))
        with torch.no_grad():
            expected_logits, expected_boxes = adapter(images, torch.tensor(sizes))
        np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(boxes, expected_boxes.numpy(), atol=1e-5)
        outputs[str(sizes)] = logits
    assert np.abs(outputs["[[90, 120]]"] - outputs["[[40, 120]]"]).max() > 1e-2


def test_torchscript_reloads_and_runs_new_sizes_and_batches(exports):
    module = torch.jit.load(str(exports["torchscript"] / "model.ts"))
    model = tiny_model()
    model.load_state_dict(torch.load(exports["weights"], weights_only=True)["model"])
    model.eval()
    spec = read_spec(exports["torchscript"])
    images, sizes = example_batch(verification_images([(101, 77), (45, 133), (70, 70)], seed=5), spec)
    with torch.no_grad():
        expected = ExportableDetr(model)(images, sizes)
        logits, boxes = module(images, sizes)
    torch.testing.assert_close(logits, expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, expected[1], atol=1e-5, rtol=0)


def records_by_file(records):
    grouped = {}
    for record in records:
        grouped.setdefault(record["file_name"], []).append(record)
    return grouped


def assert_same_records(mine, expected):
    """Same files, classes and order; scores within 1e-4; boxes within 1e-4 of the image size."""
    assert [(r["file_name"], r["category_id"], r["category_name"]) for r in mine] == \
        [(r["file_name"], r["category_id"], r["category_name"]) for r in expected]
    for record, wanted in zip(mine, expected):
        height, width = IMAGE_SIZES[int(os.path.basename(record["file_name"])[5:-4])]
        assert abs(record["score"] - wanted["score"]) <= 1e-4
        scale = np.array([width, height, width, height])
        assert np.all(np.abs(np.subtract(record["bbox"], wanted["bbox"])) <= 1e-4 * scale), (record, wanted)


def threshold_in_a_gap(scores):
    """A threshold halfway across the largest gap between the sorted middle scores."""
    ordered = sorted(scores)
    middle = range(len(ordered) // 4, 3 * len(ordered) // 4)
    best = max(middle, key=lambda i: ordered[i] - ordered[i - 1])
    return (ordered[best] + ordered[best - 1]) / 2


def test_torch_free_predictor_writes_what_the_demo_writes(exports, tmp_path):
    demo_records = json.loads((exports["demo"] / "predictions.json").read_text())
    threshold = threshold_in_a_gap([r["score"] for r in demo_records])
    everything = run_torch_free("predict_onnx.py", "--model-dir", exports["onnx"], "--input", exports["inputs"],
                                "--output", tmp_path / "all", "--confidence-threshold", "0", "--batch-size", "2")
    confident = run_torch_free("predict_onnx.py", "--model-dir", exports["onnx"], "--input", exports["inputs"],
                               "--output", tmp_path / "confident", "--confidence-threshold", threshold,
                               "--batch-size", "2")
    for run in (everything, confident):
        assert run.returncode == 1, run.stdout + run.stderr  # broken.jpg is reported and skipped
        assert "IMPORTED: []" in run.stdout
        assert "broken.jpg: not a decodable image" in run.stderr and "Traceback" not in run.stderr
    assert len(demo_records) == 10 * len(IMAGE_SIZES)
    assert_same_records(json.loads((tmp_path / "all" / "predictions.json").read_text()), demo_records)
    kept = json.loads((tmp_path / "confident" / "predictions.json").read_text())
    assert 0 < len(kept) < len(demo_records)
    assert_same_records(kept, [r for r in demo_records if r["score"] >= threshold])
    for index in range(len(IMAGE_SIZES)):
        drawing = np.asarray(Image.open(tmp_path / "confident" / f"image{index}.png"))
        original = np.asarray(Image.open(exports["inputs"] / f"image{index}.png"))
        assert drawing.shape == original.shape
        assert np.array_equal(drawing, original) == (f"image{index}.png" not in str(kept))


def test_unsupported_configs_are_refused_in_one_line(exports, datasets_root, tmp_path):
    runs = run_concurrently([
        [*export(tmp_path / "a", "onnx", exports["weights"]), "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"],
        [*export(tmp_path / "b", "onnx", exports["weights"]), "INPUT.FORMAT", "YUV-BT.601"],
        export(tmp_path / "c", "onnx", tmp_path / "missing.pth"),
        export(tmp_path / "d", "onnx", exports["weights"], "--sample-image", exports["inputs"] / "broken.jpg"),
    ], datasets_root)
    assert "Detr, GroupDetr, DeformableDetr and Dino" in assert_one_line_error(
        runs[0], "MODEL.META_ARCHITECTURE", "GeneralizedRCNN", exit_code=2)
    assert_one_line_error(runs[1], "INPUT.FORMAT", "YUV-BT.601", exit_code=2)
    assert_one_line_error(runs[2], "MODEL.WEIGHTS", "missing.pth", exit_code=2)
    assert_one_line_error(runs[3], "--sample-image", "broken.jpg", "not a decodable image", exit_code=2)
    assert not any((tmp_path / name / "export.json").exists() for name in "abcd")


def test_speed_comparison_alternates_onnxruntime_and_eager(exports):
    model = tiny_model()
    model.load_state_dict(torch.load(exports["weights"], weights_only=True)["model"])
    spec = read_spec(exports["onnx"])
    session = onnx_session(str(exports["onnx"] / "model.onnx"), num_threads=1)
    timings = time_in_turns(model.eval(), session, spec, verification_images([(121, 173)])[0], rounds=3)
    assert len(timings.onnx) == len(timings.eager) == len(timings.onnx_cpu) == 3
    assert all(seconds > 0 for seconds in timings.onnx + timings.eager)
    lines = timings.summary_lines()
    assert lines[0].startswith("onnxruntime: median") and "onnxruntime / eager" in lines[3]


def test_predictor_setup_problems_are_one_line(exports, tmp_path):
    missing = run_torch_free("predict_onnx.py", "--model-dir", tmp_path, "--input", exports["inputs"],
                             "--output", tmp_path / "out")
    torchscript = run_torch_free("predict_onnx.py", "--model-dir", exports["torchscript"], "--input",
                                 exports["inputs"], "--output", tmp_path / "out")
    for run, culprit in ((missing, "export.json does not exist"), (torchscript, "holds a torchscript export")):
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert [line for line in run.stderr.splitlines() if line.startswith("ERROR:") and culprit in line]


def test_verification_reports_a_model_that_differs(exports):
    """The ONNX file against a model with other weights: the comparison says so."""
    torch.manual_seed(1)
    other = build_model(tiny_cfg()).eval()
    spec = read_spec(exports["onnx"])
    run_exported = load_exported("onnx", str(exports["onnx"] / "model.onnx"))
    difference = compare("other weights", other, run_exported, verification_images([(97, 125)]), spec)
    assert not difference.within_tolerance and difference.label_mismatches > 0 and difference.score > 1e-3
    assert report_lines([difference], "onnx")[-1].startswith("verification FAILED")
