"""tools/visualize_attention.py run as a real subprocess on the bundled shapes DETR
(checkpoints/shapes_detr_tiny.pth) and generated images of the classes it was trained on."""
import cv2
import pytest

from detr_d2.data.shapes import PRESETS, generate_dataset
from detr_d2.errors import SetupError
from detr_d2.utils.attention_drawing import (
    CAPTION_HEIGHT,
    GAP,
    MAX_COLUMNS,
    PANEL_SIDE,
    check_points_inside,
    parse_points,
)
from tests.helpers import REPO, TOOLS, assert_one_line_error, assert_succeeded, run_concurrently

TOOL = TOOLS / "visualize_attention.py"
BUNDLED = REPO / "checkpoints" / "shapes_detr_tiny"
HEADS = 8  # of the bundled model
PANEL_WITH_CAPTION = PANEL_SIDE + CAPTION_HEIGHT


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


def _grid_rows_and_columns(path):
    """(rows, columns) of panels of a grid PNG, checked to tile it exactly."""
    image = cv2.imread(str(path))
    assert image is not None, f"{path} does not decode"
    height, width = image.shape[:2]
    assert (height - GAP) % (PANEL_WITH_CAPTION + GAP) == 0 and (width - GAP) % (PANEL_SIDE + GAP) == 0
    return (height - GAP) // (PANEL_WITH_CAPTION + GAP), (width - GAP) // (PANEL_SIDE + GAP)


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
