"""tools/visualize_attention.py run as a real subprocess on the bundled shapes DETR
(checkpoints/shapes_detr_tiny.pth) and generated images of the classes it was trained on,
and on random-weight tiny DeformableDetr and Dino models (configs/tests/tiny_deformable.yaml)."""
import cv2
import numpy as np
import pytest
import torch

from detr_d2.data.shapes import PRESETS, generate_dataset
from detr_d2.engine.build import build_model
from detr_d2.errors import SetupError
from detr_d2.utils.attention_drawing import (
    CAPTION_HEIGHT,
    GAP,
    MAX_COLUMNS,
    PANEL_SIDE,
    check_points_inside,
    parse_points,
)
from detr_d2.utils.sampling_drawing import LEVEL_COLOURS
from tests.helpers import REPO, TOOLS, assert_one_line_error, assert_succeeded, config, run_concurrently, save_weights

TOOL = TOOLS / "visualize_attention.py"
BUNDLED = REPO / "checkpoints" / "shapes_detr_tiny"
HEADS = 8  # of the bundled model


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    """(two 128-px validation images, the opts registering them for class names)."""
    root = tmp_path_factory.mktemp("attention_tool")
    jsons = generate_dataset(str(root), PRESETS["pretrain"], {"val": 2})
    register = repr((("attention_tool_val", jsons["val"], str(root / "images" / "val")),))
    opts = ["MODEL.WEIGHTS", f"{BUNDLED}.pth", "DATASETS.REGISTER_COCO", register,
            "DATASETS.TRAIN", "('attention_tool_val',)", "DATASETS.TEST", "()"]
    return sorted((root / "images" / "val").glob("*.png")), opts


def _command(inputs, output, *flags, opts):
    return [TOOL, "--config-file", f"{BUNDLED}.yaml", "--input", *inputs, "--output", output, *flags, "--opts", *opts]


def _grid_rows_and_columns(path, panel_side=PANEL_SIDE):
    """(rows, columns) of panels of a grid PNG of square images, checked to tile it exactly."""
    image = cv2.imread(str(path))
    assert image is not None, f"{path} does not decode"
    height, width = image.shape[:2]
    assert (height - GAP) % (panel_side + CAPTION_HEIGHT + GAP) == 0 and (width - GAP) % (panel_side + GAP) == 0
    return (height - GAP) // (panel_side + CAPTION_HEIGHT + GAP), (width - GAP) // (panel_side + GAP)


def test_visualize_attention_writes_a_grid_per_image_and_reports_bad_input(val_images, tmp_path):
    images, opts = val_images
    averaged, per_head = tmp_path / "averaged", tmp_path / "per_head"
    runs = run_concurrently([
        _command([*images, tmp_path / "missing.png"], averaged, "--confidence-threshold", "0.5", opts=opts),
        _command(images[:1], per_head, "--per-head", "--points", "20,30", "--confidence-threshold", "0.95",
                 opts=opts),
        _command(images[:1], tmp_path / "bad", "--points", "20,30;40", opts=opts),
    ], tmp_path)
    averaged_run, per_head_run, bad_points = runs

    assert averaged_run.returncode == 1, averaged_run.output[-3000:]  # the missing file; the others are drawn
    assert "missing.png: no such file or folder" in averaged_run.output
    for image in images:
        rows, columns = _grid_rows_and_columns(averaged / f"{image.stem}.png")
        assert rows >= 2 and 2 <= columns <= MAX_COLUMNS  # detections + one map each; 3 default points

    assert_succeeded(per_head_run)
    rows, columns = _grid_rows_and_columns(per_head / f"{images[0].stem}.png")
    assert columns == 1 + HEADS and rows >= 2  # a row per detection and one for the point

    line = assert_one_line_error(bad_points, "--points", "20,30;40", exit_code=2)
    assert "x,y;x,y" in line


def test_points_outside_an_image_are_refused_naming_point_image_and_size():
    check_points_inside([(0, 0), (127.5, 127)], 128, 128, "a.png")
    with pytest.raises(SetupError, match=r"\(20, 300\) is outside a\.png \(128x128 pixels"):
        check_points_inside([(0, 0), (20, 300)], 128, 128, "a.png")
    with pytest.raises(SetupError, match=r"\(-1, 5\)"):
        check_points_inside([(-1, 5)], 128, 128, "a.png")


def test_points_parse_from_x_y_pairs():
    assert parse_points("64,40; 20.5 ,100") == [(64.0, 40.0), (20.5, 100.0)]
    for text in ("", "64", "64,40;", "a,b", "1,2,3"):
        with pytest.raises(SetupError, match="--points"):
            parse_points(text)


SMALL_PANEL = 128  # pixels: the multi-scale grids hold many panels
MULTI_SCALE_TOPK, MULTI_SCALE_HEADS = 20, 4  # of configs/tests/tiny_deformable.yaml


@pytest.fixture(scope="module")
def multi_scale_weights(tmp_path_factory):
    """{architecture: (opts naming its weights and architecture)} of random tiny models."""
    folder = tmp_path_factory.mktemp("multi_scale_weights")
    options = {"DeformableDetr": ("MODEL.META_ARCHITECTURE", "DeformableDetr", "MODEL.MULTI_SCALE.WITH_BOX_REFINE",
                                  "True", "MODEL.MULTI_SCALE.TWO_STAGE", "True"),
               "Dino": ("MODEL.META_ARCHITECTURE", "Dino")}
    weights = {}
    for name, opts in options.items():
        torch.manual_seed(0)
        path = save_weights(build_model(config("tests/tiny_deformable.yaml", *opts)), folder / f"{name}.pth")
        weights[name] = ["MODEL.WEIGHTS", str(path), *opts]
    return weights


def _has_colour(image_bgr, rgb):
    return bool(np.all(image_bgr == np.array(rgb[::-1], np.uint8), axis=-1).any())


def _below_first_row(path, panel_side):
    """The grid's pixels (BGR) under its first row of panels (the detections, legend and
    overview), where only sampling points have the levels' colours."""
    return cv2.imread(str(path))[GAP + panel_side + CAPTION_HEIGHT:]


def test_multi_scale_models_get_their_sampling_points_drawn(val_images, multi_scale_weights, tmp_path):
    """Every detection (threshold 0: the top 20) gets a panel: DeformableDetr with the
    heads together, Dino one panel per head with --levels; bad --levels are refused."""
    images, _ = val_images
    tiny = REPO / "configs" / "tests" / "tiny_deformable.yaml"

    def command(output, *flags, model):
        return [TOOL, "--config-file", tiny, "--input", images[0], "--output", output, "--confidence-threshold",
                "0", "--panel-size", SMALL_PANEL, *flags, "--opts", *multi_scale_weights[model]]

    deformable, dino = tmp_path / "deformable", tmp_path / "dino"
    runs = run_concurrently([
        command(deformable, model="DeformableDetr"),
        command(dino, "--per-head", "--levels", "0,2", "--points", "20,30", model="Dino"),
        command(tmp_path / "bad", "--levels", "4", model="Dino"),
        _command(images[:1], tmp_path / "detr", "--levels", "0", opts=val_images[1]),
    ], tmp_path)
    deformable_run, dino_run, bad_level, detr_levels = runs

    assert_succeeded(deformable_run)
    drawing = deformable / f"{images[0].stem}.png"
    rows, columns = _grid_rows_and_columns(drawing, SMALL_PANEL)
    # overview + legend + 20 detections in rows of 6; then the points' overview + up to 3 points
    assert (rows, columns) == (-(-(2 + MULTI_SCALE_TOPK) // MAX_COLUMNS) + 1, MAX_COLUMNS)
    # levels 0-2 (level 3's stride-64 offsets reach beyond the 128-px image at initialisation)
    assert all(_has_colour(_below_first_row(drawing, SMALL_PANEL), colour) for colour in LEVEL_COLOURS[:3])

    assert_succeeded(dino_run)
    drawing = dino / f"{images[0].stem}.png"
    rows, columns = _grid_rows_and_columns(drawing, SMALL_PANEL)
    assert (rows, columns) == (1 + MULTI_SCALE_TOPK + 1, 1 + MULTI_SCALE_HEADS)  # a row per detection and point
    pixels = _below_first_row(drawing, SMALL_PANEL)
    assert _has_colour(pixels, LEVEL_COLOURS[0]) and _has_colour(pixels, LEVEL_COLOURS[2])
    assert not _has_colour(pixels, LEVEL_COLOURS[1]) and not _has_colour(pixels, LEVEL_COLOURS[3])

    line = assert_one_line_error(bad_level, "--levels", "level 4", exit_code=2)
    assert "NUM_FEATURE_LEVELS" in line
    assert_one_line_error(detr_levels, "--levels", "Detr", exit_code=2)
