"""Tests of detr_d2.data.shapes, the synthetic COCO shape-dataset generator, and its command line
datasets/prepare_shapes.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO

from detr_d2.data import shapes as ps
from tests.helpers import REPO

SCRIPT = REPO / "datasets" / "prepare_shapes.py"

SMALL = {"train": 4, "val": 3}


def _generate(output_dir, classes=ps.PRESETS["custom"], splits=SMALL, **kwargs):
    """Generate a small dataset and return {split: json path}."""
    return ps.generate_dataset(str(output_dir), classes, splits, **kwargs)


def _read_rgb(path):
    """Pixels of a PNG as uint8 RGB."""
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]


def _dataset_files(output_dir):
    """{relative path: bytes} of every json and PNG under ``output_dir``."""
    root = Path(output_dir)
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.suffix in (".json", ".png")}


@pytest.fixture(scope="module")
def custom_dataset(tmp_path_factory):
    """A small dataset of the ``custom`` preset: (output_dir, {split: json path})."""
    output_dir = tmp_path_factory.mktemp("custom")
    return output_dir, _generate(output_dir)


def test_presets_are_distinct_known_shapes():
    assert len(ps.PRESETS["pretrain"]) >= 4
    assert len(ps.PRESETS["custom"]) == 2
    assert not set(ps.PRESETS["pretrain"]) & set(ps.PRESETS["custom"])
    assert set(ps.PRESETS["pretrain"]) | set(ps.PRESETS["custom"]) <= set(ps.KNOWN_SHAPES)


def test_layout_and_coco_json(custom_dataset):
    output_dir, json_paths = custom_dataset
    assert set(json_paths) == set(SMALL)
    for split, num_images in SMALL.items():
        assert json_paths[split] == str(output_dir / "annotations" / f"{split}.json")
        coco = COCO(json_paths[split])
        cats = coco.loadCats(coco.getCatIds())
        assert [c["name"] for c in cats] == list(ps.PRESETS["custom"])
        assert [c["id"] for c in cats] == [1, 2]
        assert all(c["supercategory"] == "shape" for c in cats)
        images = coco.loadImgs(coco.getImgIds())
        assert [im["file_name"] for im in images] == [f"{i:06d}.png" for i in range(num_images)]
        for image in images:
            pixels = _read_rgb(output_dir / "images" / split / image["file_name"])
            assert pixels.shape == (image["height"], image["width"], 3) == (128, 128, 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert 1 <= len(anns) <= 5
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert all(isinstance(v, float) for v in ann["bbox"])
                assert w > 0 and h > 0 and x >= 0 and y >= 0
                assert x + w <= image["width"] and y + h <= image["height"]
                assert 0 < ann["area"] <= w * h
                assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 2)
                assert max(w, h) <= 60


def test_boxes_are_tight_around_drawn_pixels(custom_dataset):
    output_dir, json_paths = custom_dataset
    classes = ps.PRESETS["custom"]
    coco = json.loads(Path(json_paths["train"]).read_text())
    for image in coco["images"]:
        index = image["id"] - 1
        pixels = _read_rgb(output_dir / "images" / "train" / image["file_name"])
        rendered, objects = ps.render_sample(ps.sample_rng(0, "train", index, classes), classes,
                                             ps.ImageSettings())
        np.testing.assert_array_equal(rendered, pixels)
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert [a["bbox"] for a in anns] == [o.bbox_xywh() for o in objects]
        assert [a["category_id"] for a in anns] == [o.class_index + 1 for o in objects]
        for ann, obj in zip(anns, objects):
            assert np.all(pixels[obj.mask] == obj.colour)
            x, y, w, h = (int(v) for v in ann["bbox"])
            has_colour = np.all(pixels[y:y + h, x:x + w] == obj.colour, axis=2)
            assert has_colour[0].any() and has_colour[-1].any(), "top/bottom edge not touched"
            assert has_colour[:, 0].any() and has_colour[:, -1].any(), "left/right edge not touched"
            assert ann["area"] == int(obj.mask.sum())
            assert np.array_equal(mask_util.decode(ann["segmentation"]).astype(bool), obj.mask)


def test_every_shape_spans_its_size_exactly():
    rng = np.random.default_rng(1)
    for name in ps.KNOWN_SHAPES:
        for size in (12, 37, 60):
            points = ps.fit_outline(ps.shape_outline(name, rng), size, 5, 9)
            ys, xs = np.nonzero(ps.rasterize(points, 128))
            assert xs.min() >= 5 and ys.min() >= 9
            assert max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 == size, name


def test_same_seed_gives_identical_files(tmp_path, custom_dataset):
    output_dir, _ = custom_dataset
    _generate(tmp_path)
    first, second = _dataset_files(output_dir), _dataset_files(tmp_path)
    assert first.keys() == second.keys()
    assert first == second


def test_different_seed_differs(tmp_path, custom_dataset):
    output_dir, json_paths = custom_dataset
    other = _generate(tmp_path, seed=1)
    assert Path(other["train"]).read_bytes() != Path(json_paths["train"]).read_bytes()
    same_name = "images/train/000000.png"
    assert not np.array_equal(_read_rgb(tmp_path / same_name), _read_rgb(output_dir / same_name))


def test_split_does_not_depend_on_other_split_sizes(tmp_path, custom_dataset):
    output_dir, json_paths = custom_dataset
    other = _generate(tmp_path, splits={"train": 1, "val": SMALL["val"]})
    assert Path(other["val"]).read_bytes() == Path(json_paths["val"]).read_bytes()


def test_class_list_changes_the_images(tmp_path, custom_dataset):
    output_dir, _ = custom_dataset
    _generate(tmp_path, classes=ps.PRESETS["pretrain"], splits={"train": 1})
    same_name = "images/train/000000.png"
    assert not np.array_equal(_read_rgb(tmp_path / same_name), _read_rgb(output_dir / same_name))


def test_cache_skips_identical_run_and_regenerates_on_change(tmp_path, capsys):
    _generate(tmp_path)
    watched = [tmp_path / "manifest.json", tmp_path / "annotations" / "train.json",
               tmp_path / "images" / "val" / "000000.png"]
    mtimes = [p.stat().st_mtime_ns for p in watched]
    capsys.readouterr()

    _generate(tmp_path)
    assert "skipping" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in watched] == mtimes

    _generate(tmp_path, max_objects=2)
    assert "skipping" not in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["max_objects"] == 2
    coco = json.loads((tmp_path / "annotations" / "train.json").read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])
    assert per_image.max() <= 2


def test_missing_file_or_smaller_split_regenerates_and_cleans_up(tmp_path, capsys):
    _generate(tmp_path)
    (tmp_path / "images" / "train" / "000002.png").unlink()
    capsys.readouterr()
    _generate(tmp_path)
    assert "skipping" not in capsys.readouterr().out
    assert (tmp_path / "images" / "train" / "000002.png").is_file()

    leftover = tmp_path / "images" / "train" / ".000001.png.4242.tmp"
    leftover.write_bytes(b"half a png")
    _generate(tmp_path, splits={"train": 2, "val": SMALL["val"]})
    assert sorted(os.listdir(tmp_path / "images" / "train")) == ["000000.png", "000001.png"]


def test_no_temporary_files_left(custom_dataset):
    output_dir, _ = custom_dataset
    leftovers = [p for p in output_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.parametrize("kwargs", [
    {"classes": ["star", "dodecahedron"]},
    {"classes": ["star", "star"]},
    {"max_size": 200},
    {"min_objects": 3, "max_objects": 2},
    {"splits": {"../escape": 1}},
    {"seed": -1},
])
def test_invalid_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        _generate(tmp_path, **kwargs)


def test_cli_subprocess(tmp_path):
    output_dir = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--preset", "custom", "--output", str(output_dir),
           "--splits", "train:5,val:3"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    for split, num_images in (("train", 5), ("val", 3)):
        coco = COCO(str(output_dir / "annotations" / f"{split}.json"))
        assert len(coco.getImgIds()) == num_images
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["star", "cross"]
    assert len(list((output_dir / "images" / "train").glob("*.png"))) == 5

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert again.returncode == 0 and "skipping" in again.stdout


def test_cli_explicit_classes_and_bad_arguments(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--classes", "hexagon,star,circle", "--output",
           str(tmp_path), "--splits", "train:2", "--image-size", "64", "--max-size", "30", "--seed", "7"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    coco = json.loads((tmp_path / "annotations" / "train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["hexagon", "star", "circle"]
    assert {(im["width"], im["height"]) for im in coco["images"]} == {(64, 64)}

    bad = subprocess.run([sys.executable, str(SCRIPT), "--classes", "blob", "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "blob" in bad.stderr
