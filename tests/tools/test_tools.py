"""The command-line tools (demo, visualize_data, plot_logs, analyze_model), each run as a
real subprocess on the converted tiny reference model and a small shapes dataset.

The model is the reference fixture ../shared/fixtures/detr_upstream_tiny (4 classes, random
weights), converted with the converter CLI; the data: 4 shape classes, 128-px images.
"""
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

import detr_d2  # noqa: F401
from detr_d2.data.shapes import generate_dataset
from tests.helpers import REPO, config_for_fixture, fixture_dir

CLASSES = ["circle", "rectangle", "triangle", "star"]  # the fixture model has 4 classes
IMAGE_SIZE = 128
TEST_SIZE = 160  # INPUT.MIN_SIZE_TEST: the demo resizes, results come back in 128-px pixels
NUM_QUERIES = 10
TRAIN_SIZE = 144  # INPUT.MIN_SIZE_TRAIN of the dataloader drawings


def run_tool(tool, *args, timeout=240):
    """Run ``tools/<tool> ARGS`` from the repository root; the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, converted_reference):
    """{"config": config file, "cfg": its CfgNode (NUM_CLASSES set), "root": data folder,
    "jsons": {split: COCO json}, "val_images": paths}."""
    fixture = fixture_dir("detr_upstream_tiny")
    root = tmp_path_factory.mktemp("tools")
    weights, _ = converted_reference("detr_upstream_tiny")
    jsons = generate_dataset(root / "shapes", CLASSES, {"train": 3, "val": 4},
                             image_size=IMAGE_SIZE, min_size=30, seed=5)
    cfg = config_for_fixture(fixture)
    cfg.DATASETS.REGISTER_COCO = (("tools_train", jsons["train"], str(root / "shapes/images/train")),
                                  ("tools_val", jsons["val"], str(root / "shapes/images/val")))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("tools_train",), ("tools_val",)
    cfg.MODEL.DETR.NUM_CLASSES = None  # from the data
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = TEST_SIZE, 400
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (TRAIN_SIZE,), 400
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.CROP.ENABLED = False
    cfg.SEED = 0
    config = root / "config.yaml"
    config.write_text(cfg.dump())
    cfg.MODEL.DETR.NUM_CLASSES = len(CLASSES)  # for the in-process reference runs
    val_images = sorted((root / "shapes/images/val").glob("*.png"))
    return {"config": config, "cfg": cfg, "root": root, "jsons": jsons, "val_images": val_images}


def read_rgb(path):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode"
    return image[:, :, ::-1]


def box_outline(box_xywh, shape):
    """Boolean mask of the 1-px outline of a COCO box (x, y, w, h) rounded to pixels."""
    x, y, w, h = box_xywh
    x0, y0 = max(int(round(x)), 0), max(int(round(y)), 0)
    x1, y1 = min(int(round(x + w)), shape[1] - 1), min(int(round(y + h)), shape[0] - 1)
    mask = np.zeros(shape[:2], bool)
    mask[y0:y1 + 1, [x0, x1]] = True
    mask[[y0, y1], x0:x1 + 1] = True
    return mask


def reference_detections(cfg, image_paths):
    """{path: [(score, class, [x, y, w, h])]} of detectron2's DefaultPredictor, all queries."""
    predictor = DefaultPredictor(cfg)
    detections = {}
    for path in image_paths:
        instances = predictor(cv2.imread(str(path)))["instances"]
        boxes = instances.pred_boxes.tensor.tolist()
        detections[str(path)] = [(s, c, [x0, y0, x1 - x0, y1 - y0]) for s, c, (x0, y0, x1, y1)
                                 in zip(instances.scores.tolist(), instances.pred_classes.tolist(), boxes)]
    return detections


def threshold_between(scores):
    """A threshold in the largest gap between the sorted scores of the middle half."""
    ordered = sorted(scores)
    candidates = range(max(len(ordered) // 4, 1), 3 * len(ordered) // 4)
    best = max(candidates, key=lambda i: ordered[i] - ordered[i - 1])
    return (ordered[best] + ordered[best - 1]) / 2


def pop_match(record, detections):
    """Remove and return the (score, class, box) of ``detections`` equal to the record."""
    for index, (score, label, box) in enumerate(detections):
        if (abs(record["score"] - score) < 1e-4 and record["category_name"] == CLASSES[label]
                and record["bbox"] == pytest.approx(box, abs=0.05)):
            return detections.pop(index)
    raise AssertionError(f"{record} is not among the expected detections {detections}")


def write_corrupt_images(folder):
    """{file: reason fragment}: an empty .jpg, a text file named .jpg, a truncated PNG."""
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image\n")
    png = cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()
    (folder / "truncated.png").write_bytes(png[:len(png) // 2])
    return {"empty.jpg": "not a decodable image", "notes.jpg": "not a decodable image",
            "truncated.png": "truncated"}


def test_demo_draws_and_records_confident_detections(setup, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = []
    for path in setup["val_images"]:
        good.append(inputs / path.name)
        good[-1].write_bytes(path.read_bytes())
    corrupt = write_corrupt_images(inputs)
    expected = reference_detections(setup["cfg"], good)
    threshold = threshold_between([d[0] for dets in expected.values() for d in dets])
    output = tmp_path / "out"

    result = run_tool("demo.py", "--config-file", setup["config"], "--input", inputs, "--output", output,
                      "--confidence-threshold", threshold, "--batch-size", 3)

    assert result.returncode == 1, result.stdout + result.stderr
    log = result.stdout + result.stderr
    for name, reason in corrupt.items():
        assert any(name in line and reason in line for line in log.splitlines()), (name, log)
    assert "Traceback" not in log
    records = json.loads((output / "predictions.json").read_text())
    assert {r["file_name"] for r in records} <= {str(p) for p in good}
    for path in good:
        drawn, original = read_rgb(output / path.name), read_rgb(path)
        assert drawn.shape == original.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        changed = np.abs(drawn.astype(int) - original.astype(int)).max(axis=2) > 10
        mine = [r for r in records if r["file_name"] == str(path)]
        wanted = [d for d in expected[str(path)] if d[0] >= threshold]
        assert len(mine) == len(wanted)
        for record in mine:  # boxes: COCO xywh in pixels of the original image
            assert record["score"] >= threshold
            assert record["category_id"] == pop_match(record, wanted)[1] + 1  # the dataset's COCO id
            x, y, w, h = record["bbox"]
            assert 0 <= x and 0 <= y and x + w <= IMAGE_SIZE + 1e-3 and y + h <= IMAGE_SIZE + 1e-3
            assert changed[box_outline(record["bbox"], drawn.shape)].mean() > 0.5
        if not mine:
            assert not changed.any()
    assert records, "the threshold should keep some detections"


def test_demo_draw_scale_enlarges_the_drawing_and_its_boxes(setup, tmp_path):
    """--draw-scale 4: a 128-px image is drawn at 512 px, each box at 4x its coordinates;
    predictions.json keeps the pixels of the original image."""
    path = setup["val_images"][0]
    result = run_tool("demo.py", "--config-file", setup["config"], "--input", path, "--output", tmp_path,
                      "--confidence-threshold", 0.0, "--draw-scale", 4)
    assert result.returncode == 0, result.stdout + result.stderr
    drawn = read_rgb(tmp_path / path.name)
    assert drawn.shape == (4 * IMAGE_SIZE, 4 * IMAGE_SIZE, 3)
    enlarged = cv2.resize(read_rgb(path), (4 * IMAGE_SIZE, 4 * IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    changed = np.abs(drawn.astype(int) - enlarged.astype(int)).max(axis=2) > 10
    records = json.loads((tmp_path / "predictions.json").read_text())
    assert records and all(r["bbox"][0] + r["bbox"][2] <= IMAGE_SIZE + 1e-3 for r in records)
    best = max(records, key=lambda r: r["score"])
    assert changed[box_outline([4 * v for v in best["bbox"]], drawn.shape)].mean() > 0.5
    assert run_tool("demo.py", "--config-file", setup["config"], "--input", path, "--output", tmp_path,
                    "--draw-scale", 0).returncode == 2


def write_video(path, frames, fps):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (IMAGE_SIZE, IMAGE_SIZE))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()


def read_video(path):
    """(frames, fps) of a video file."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (frame := capture.read()[1]) is not None:
        frames.append(frame)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


def test_demo_annotates_every_frame_of_a_video(setup, tmp_path):
    images = [cv2.imread(str(path)) for path in setup["val_images"]]
    write_video(tmp_path / "clip.mp4", [images[i % len(images)] for i in range(10)], fps=5)
    inputs, input_fps = read_video(tmp_path / "clip.mp4")

    result = run_tool("demo.py", "--config-file", setup["config"], "--input", tmp_path / "clip.mp4",
                      "--output", tmp_path / "out", "--confidence-threshold", 0.0)

    assert result.returncode == 0, result.stdout + result.stderr
    frames, fps = read_video(tmp_path / "out" / "clip.mp4")
    assert len(frames) == len(inputs) == 10
    assert fps == input_fps == 5
    assert all(f.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) for f in frames)
    assert all(np.abs(f.astype(int) - i.astype(int)).max() > 50 for f, i in zip(frames, inputs))
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted({r["frame"] for r in records}) == list(range(10))
    assert len(records) == 10 * NUM_QUERIES
    assert {r["category_name"] for r in records} <= set(CLASSES)


@pytest.mark.parametrize("problem", ["config", "weights"])
def test_demo_setup_errors_are_one_line(setup, tmp_path, problem):
    config = tmp_path / "missing.yaml" if problem == "config" else setup["config"]
    opts = ["--opts", "MODEL.WEIGHTS", tmp_path / "missing.pth"] if problem == "weights" else []
    result = run_tool("demo.py", "--config-file", config, "--input", setup["val_images"][0],
                      "--output", tmp_path / "out", *opts)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "missing." in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_visualize_data_draws_annotations(setup, tmp_path):
    result = run_tool("visualize_data.py", "--config-file", setup["config"], "--source", "annotation",
                      "--output-dir", tmp_path, "--num", 2)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(setup["jsons"]["train"]) as file:
        dataset = json.load(file)
    drawings = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in drawings] == ["tools_train_000000.png", "tools_train_000001.png"]
    for image_id, drawing in enumerate(drawings, start=1):
        original = read_rgb(setup["root"] / "shapes/images/train" / drawing.name.replace("tools_train_", ""))
        drawn = read_rgb(drawing)
        assert drawn.shape == original.shape
        changed = np.abs(drawn.astype(int) - original.astype(int)).max(axis=2) > 10
        for annotation in (a for a in dataset["annotations"] if a["image_id"] == image_id):
            assert changed[box_outline(annotation["bbox"], drawn.shape)].mean() > 0.5


def test_visualize_data_draws_the_training_mapper_output(setup, tmp_path):
    result = run_tool("visualize_data.py", "--config-file", setup["config"], "--source", "dataloader",
                      "--output-dir", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    drawings = sorted(tmp_path.glob("*.png"))
    assert len(drawings) == 3
    for drawing in drawings:  # resized by INPUT.MIN_SIZE_TRAIN, as the model is fed
        assert read_rgb(drawing).shape == (TRAIN_SIZE, TRAIN_SIZE, 3)


def write_metrics(run_dir, total_iters, eval_period, decay, validation=False):
    """A metrics.json as detectron2's JSONWriter writes it during a DETR training run; with
    ``validation`` the evaluations also hold the criterion on the test set (val/...)."""
    run_dir.mkdir()
    lines = []
    for iteration in range(19, total_iters, 20):
        loss = math.exp(-iteration / decay)
        lines.append({"cardinality_error": 8 * loss, "class_error": 100 * loss, "data_time": 0.007,
                      "iteration": iteration, "loss_bbox": 2 * loss, "loss_bbox_0": 2.2 * loss,
                      "loss_ce": 1.5 * loss, "loss_giou": 1.8 * loss, "lr": 3e-4, "time": 0.25,
                      "total_loss": 5.3 * loss})
        if (iteration + 1) % eval_period == 0:
            ap = 100 * (1 - loss)
            lines.append({"bbox/AP": ap, "bbox/AP-circle": float("nan"), "bbox/AP50": min(100, ap * 1.4),
                          "bbox/AP75": ap * 0.9, "bbox/APl": ap, "bbox/APm": ap, "bbox/APs": float("nan"),
                          "iteration": iteration + 1})
            if validation:  # the validation loss turns up again late: over-fitting
                lines[-1].update({"val/loss": 6 * loss + iteration / total_iters, "val/loss_ce": 1.7 * loss,
                                  "val/loss_ce_unscaled": 1.7 * loss, "val/class_error": 100 * loss + 5,
                                  "val/cardinality_error": 8 * loss + 1})
    (run_dir / "metrics.json").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def plot_logs():
    """tools/plot_logs.py as a module (a script, not a package), its console logging set up
    here, outside any test's output capture."""
    spec = importlib.util.spec_from_file_location("plot_logs_tool", REPO / "tools" / "plot_logs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.setup_tool_logging()
    return module


def plot_in_process(plot_logs, caplog, *args):
    """(exit status, logged text) of ``tools/plot_logs.py ARGS`` run in this process as its
    command line runs it (``run_tool(main)``: a SetupError is one ERROR line on stderr)."""
    logger = logging.getLogger("detectron2")  # the tool's logger; it does not propagate
    caplog.clear()
    logger.addHandler(caplog.handler)
    try:
        status = plot_logs.run_tool(plot_logs.main, [str(arg) for arg in args])
    finally:
        logger.removeHandler(caplog.handler)
    return status, caplog.text


def test_plot_logs_overlays_runs(tmp_path, plot_logs, capsys, caplog):
    """The command line in a subprocess; a missing run refused in one line (in this process)."""
    write_metrics(tmp_path / "run_a", 400, 100, decay=150)
    write_metrics(tmp_path / "run_b", 300, 100, decay=80)
    result = run_tool("plot_logs.py", tmp_path / "run_a", tmp_path / "run_b", "--output",
                      tmp_path / "curves.png", "--smooth", 3)
    assert result.returncode == 0, result.stdout + result.stderr
    curves = read_rgb(tmp_path / "curves.png")
    assert curves.shape[0] > 500 and curves.shape[1] > 500 and curves.std() > 10
    missing, _ = plot_in_process(plot_logs, caplog, tmp_path / "run_a", tmp_path / "nowhere", "--output",
                                 tmp_path / "x.png")
    assert missing == 2
    assert f"ERROR: No metrics.json in {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_logs_draws_validation_beside_training(tmp_path, plot_logs, caplog):
    """val/ values (TEST.EVAL_LOSSES) are drawn in the panels of their training metric."""
    write_metrics(tmp_path / "with_val", 400, 100, decay=150, validation=True)
    write_metrics(tmp_path / "without", 400, 100, decay=150)
    plots, logs = {}, {}
    for run in ("with_val", "without"):
        status, logs[run] = plot_in_process(plot_logs, caplog, tmp_path / run, "--output", tmp_path / f"{run}.png")
        assert status == 0, logs[run]
        plots[run] = read_rgb(tmp_path / f"{run}.png")
    assert "validation curves: val/cardinality_error, val/class_error, val/loss, val/loss_ce" in logs["with_val"]
    assert "no validation values logged" in logs["without"]
    assert plots["with_val"].shape == plots["without"].shape
    differs = np.abs(plots["with_val"].astype(int) - plots["without"].astype(int)).max(axis=2) > 50
    assert differs.mean() > 0.002


def test_plot_logs_training_minutes_sum_the_logged_iteration_times(plot_logs):
    """Rows logged every 20 iterations from iteration 19: 20 iterations at each row's "time"."""
    rows = [{"iteration": 19, "time": 0.3}, {"iteration": 39, "time": 0.6}, {"iteration": 40, "bbox/AP": 5.0},
            {"iteration": 59, "time": 0.3}]
    iterations, minutes = plot_logs.training_clock(rows)
    assert iterations.tolist() == [19, 39, 59]
    assert minutes.tolist() == pytest.approx([20 * 0.3 / 60, 20 * 0.9 / 60, 20 * 1.2 / 60])
    assert plot_logs.training_clock([{"iteration": 40, "bbox/AP": 5.0}]) is None
    measured = plot_logs.with_iteration_seconds(rows, 1.5)  # --iteration-seconds 1.5: iterations x 1.5 s
    assert plot_logs.training_clock(measured)[0].tolist() == [19, 39, 40, 59]
    assert plot_logs.training_clock(measured)[1].tolist() == pytest.approx([0.5, 1.0, 1.025, 1.5])
    evaluations_only = plot_logs.with_iteration_seconds([{"iteration": 999, "bbox/AP": 5.0}], 0.6)
    assert plot_logs.training_clock(evaluations_only)[1].tolist() == pytest.approx([10.0])


def test_plot_logs_names_runs_and_draws_panels_against_iterations_and_minutes(tmp_path, plot_logs, capsys, caplog):
    write_metrics(tmp_path / "run_a", 400, 100, decay=150)
    write_metrics(tmp_path / "run_b", 300, 100, decay=80)
    runs, common = [tmp_path / "run_a", tmp_path / "run_b"], ["--panels", "bbox/AP", "bbox/AP50"]
    figures = {}
    for x_axes in (["iteration"], ["minutes"], ["iteration", "minutes"]):
        output = tmp_path / f"{'_'.join(x_axes)}.png"
        status, log = plot_in_process(plot_logs, caplog, *runs, "--labels", "A", "B", "--x", *x_axes, *common,
                                      "--output", output)
        assert status == 0, log
        figures[tuple(x_axes)] = read_rgb(output)
    one_row = figures[("iteration",)]
    assert figures[("iteration", "minutes")].shape[0] > 1.5 * one_row.shape[0]  # a row of panels per axis
    assert figures[("minutes",)].shape == one_row.shape and not np.array_equal(figures[("minutes",)], one_row)
    capsys.readouterr()
    wrong, _ = plot_in_process(plot_logs, caplog, *runs, "--labels", "A", "--output", tmp_path / "x.png")
    assert wrong == 2 and "--labels gives 1 name(s) for 2 run(s)" in capsys.readouterr().err
    timeless = tmp_path / "timeless"
    timeless.mkdir()
    (timeless / "metrics.json").write_text(json.dumps({"iteration": 99, "bbox/AP": 5.0}) + "\n")
    no_time, _ = plot_in_process(plot_logs, caplog, timeless, "--x", "minutes", "--output", tmp_path / "y.png")
    assert no_time == 2 and "logged no iteration times" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_analyze_model_counts_parameters_and_flops(setup, tmp_path):
    result = run_tool("analyze_model.py", "--config-file", setup["config"], "--input-size", "96x128",
                      "--json", tmp_path / "report.json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    model = build_model(setup["cfg"])
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    modules = {row["name"]: row for row in report["modules"]}
    for name in ("backbone", "input_proj", "transformer", "query_embed", "class_embed", "bbox_embed"):
        assert modules[name]["parameters"] == sum(p.numel() for p in getattr(model, name).parameters())
        assert name in result.stdout
    assert sum(row["flops"] for row in report["modules"]) == report["flops"] > 0
    assert modules["transformer"]["flops"] > 0 and modules["backbone"]["flops"] > 0
    assert "aten::scaled_dot_product_attention" not in report["uncounted_operators"]
