"""DetrDatasetMapper on real image files with real detectron2 augmentations."""
import copy

import cv2
import numpy as np
import pytest
import torch

import detr_d2
from detectron2.config import get_cfg
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from detr_d2.data import DetrDatasetMapper, RandomApplyList, build_detr_augmentation
from detr_d2.data.dataset_mapper import annotation_boxes_xyxy, transform_boxes

CROP_SIZE = (38, 60)


def small_cfg(crop_prob=0.5, min_size_train=(48, 64), max_size_train=100):
    """DETR config scaled down ~10x so that many samples are fast."""
    cfg = get_cfg()
    detr_d2.add_detr_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = min_size_train
    cfg.INPUT.MAX_SIZE_TRAIN = max_size_train
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 100
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute_range"
    cfg.INPUT.CROP.SIZE = CROP_SIZE
    cfg.INPUT.CROP.PRE_RESIZE_SIZES = (40, 50, 60)
    cfg.INPUT.CROP.PROBABILITY = crop_prob
    return cfg


def write_image(path, height, width, bgr=(40, 80, 120)):
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = bgr
    cv2.imwrite(str(path), image)
    return str(path)


def record(file_name, height, width, annotations=()):
    return {"file_name": file_name, "height": height, "width": width, "image_id": 7,
            "annotations": [dict(a) for a in annotations]}


def box(bbox, category_id=1, iscrowd=0, mode=BoxMode.XYXY_ABS):
    return {"bbox": list(bbox), "bbox_mode": mode, "category_id": category_id,
            "iscrowd": iscrowd}


def plain_mapper(augmentations, is_train=True):
    return DetrDatasetMapper(is_train, augmentations=augmentations, image_format="RGB")


@pytest.fixture
def wide_record(tmp_path):
    """A 20 x 80 image (aspect 4) with one box: the crop branch is told by the aspect."""
    path = write_image(tmp_path / "wide.png", 20, 80)
    return record(path, 20, 80, [box((10, 2, 30, 18), category_id=3)])


def aspect(output):
    _, h, w = output["image"].shape
    return w / h


def test_from_config_builds_reference_augmentation():
    cfg = small_cfg()
    augs = build_detr_augmentation(cfg, is_train=True)
    assert [type(a) for a in augs] == [T.RandomFlip, RandomApplyList, T.ResizeShortestEdge]
    pre_resize, crop = augs[1].augs.augs
    assert pre_resize.short_edge_length == (40, 50, 60) and pre_resize.max_size > 10**6
    assert (crop.crop_type, tuple(crop.crop_size)) == ("absolute_range", CROP_SIZE)
    assert augs[1].prob == 0.5
    assert augs[2].short_edge_length == (48, 64) and augs[2].max_size == 100
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.RANDOM_FLIP = "none"
    assert [type(a) for a in build_detr_augmentation(cfg, True)] == [T.ResizeShortestEdge]
    mapper = DetrDatasetMapper(cfg, is_train=False)
    assert not mapper.is_train and mapper.image_format == "RGB"
    assert [type(a) for a in mapper.augmentations.augs] == [T.ResizeShortestEdge]


def test_train_sizes_obey_min_and_max_size(tmp_path):
    mapper = DetrDatasetMapper(small_cfg(), is_train=True)
    rec = record(write_image(tmp_path / "a.jpg", 30, 90), 30, 90, [box((0, 0, 90, 30))])
    np.random.seed(0)
    for _ in range(30):
        _, h, w = mapper(rec)["image"].shape
        assert max(h, w) <= 100
        assert min(h, w) in (48, 64) or max(h, w) == 100


def test_test_sizes_and_annotations_dropped(tmp_path):
    mapper = DetrDatasetMapper(small_cfg(), is_train=False)
    small = record(write_image(tmp_path / "s.jpg", 30, 40), 30, 40, [box((0, 0, 5, 5))])
    out = mapper(small)
    assert tuple(out["image"].shape) == (3, 64, 85)  # shortest edge 64
    assert "annotations" not in out and "instances" not in out
    assert (out["height"], out["width"], out["image_id"]) == (30, 40, 7)
    wide = record(write_image(tmp_path / "w.jpg", 30, 90), 30, 90)
    assert tuple(mapper(wide)["image"].shape) == (3, 33, 100)  # longest edge capped


def test_test_mode_with_instances_keeps_ground_truth_in_the_resized_image(tmp_path):
    """For validation losses: the test resize moves the boxes, crowd boxes are dropped; a
    record without "annotations" (an unlabelled test set) gets no instances."""
    mapper = DetrDatasetMapper(small_cfg(), is_train=False, with_instances=True)
    labelled = record(write_image(tmp_path / "s.jpg", 30, 40), 30, 40,
                      [box((4, 6, 20, 30), category_id=2), box((0, 0, 5, 5), category_id=4, iscrowd=1)])
    out = mapper(labelled)
    assert tuple(out["image"].shape) == (3, 64, 85) and "annotations" not in out
    assert out["instances"].image_size == (64, 85)
    assert out["instances"].gt_classes.tolist() == [2]
    scale_x, scale_y = 85 / 40, 64 / 30
    expected = [[4 * scale_x, 6 * scale_y, 20 * scale_x, 30 * scale_y]]
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, torch.tensor(expected))
    unlabelled = {k: v for k, v in labelled.items() if k != "annotations"}
    assert "instances" not in mapper(unlabelled)


def test_default_test_size_is_800_1333(tmp_path):
    cfg = get_cfg()
    detr_d2.add_detr_config(cfg)
    out = DetrDatasetMapper(cfg, is_train=False)(record(write_image(tmp_path / "d.jpg", 60, 80),
                                                        60, 80))
    assert tuple(out["image"].shape) == (3, 800, 1067)


def test_crop_forced_on_gives_at_most_crop_size(wide_record):
    # MIN_SIZE_TRAIN 0: detectron2's ResizeShortestEdge keeps the size, so the output is
    # the crop itself.
    mapper = DetrDatasetMapper(small_cfg(crop_prob=1.0, min_size_train=(0,)), is_train=True)
    np.random.seed(1)
    for _ in range(30):
        out = mapper(wide_record)
        _, h, w = out["image"].shape
        assert CROP_SIZE[0] <= h <= CROP_SIZE[1] and CROP_SIZE[0] <= w <= CROP_SIZE[1]
        boxes = out["instances"].gt_boxes.tensor
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
        assert out["instances"].image_size == (h, w)


def test_crop_and_no_crop_branches_are_about_even_and_seeded(wide_record):
    mapper = DetrDatasetMapper(small_cfg(crop_prob=0.5), is_train=True)
    np.random.seed(2)
    aspects = np.array([aspect(mapper(wide_record)) for _ in range(300)])
    cropped = aspects <= CROP_SIZE[1] / CROP_SIZE[0] + 0.05
    assert np.all(cropped | (np.abs(aspects - 4) < 0.05))
    assert 0.4 < cropped.mean() < 0.6
    np.random.seed(2)
    assert np.allclose([aspect(mapper(wide_record)) for _ in range(20)], aspects[:20])


def test_crop_disabled_never_crops(wide_record):
    cfg = small_cfg(crop_prob=1.0)
    cfg.INPUT.CROP.ENABLED = False
    mapper = DetrDatasetMapper(cfg, is_train=True)
    np.random.seed(3)
    assert all(abs(aspect(mapper(wide_record)) - 4) < 0.05 for _ in range(10))


def test_horizontal_flip_mirrors_box_and_pixels(tmp_path):
    image = np.zeros((40, 100, 3), np.uint8)
    image[:, :10] = (0, 0, 255)  # red (BGR) left band
    cv2.imwrite(str(tmp_path / "f.png"), image)
    rec = record(str(tmp_path / "f.png"), 40, 100,
                 [box((10, 5, 20, 10), mode=BoxMode.XYWH_ABS)])
    out = plain_mapper([T.RandomFlip(prob=1.0)])(rec)
    assert out["instances"].gt_boxes.tensor.tolist() == [[70.0, 5.0, 90.0, 15.0]]
    assert (out["image"][0, :, 90:] == 255).all() and (out["image"][0, :, :90] == 0).all()


def test_crowd_annotations_dropped(wide_record):
    wide_record["annotations"].append(box((0, 0, 5, 5), category_id=9, iscrowd=1))
    out = plain_mapper([])(wide_record)
    assert out["instances"].gt_classes.tolist() == [3]
    assert out["instances"].gt_boxes.tensor.tolist() == [[10.0, 2.0, 30.0, 18.0]]


def test_crop_clips_partial_boxes_and_removes_cut_out_ones(tmp_path):
    rec = record(write_image(tmp_path / "c.png", 30, 100), 30, 100, [
        box((0, 0, 10, 10), category_id=1),    # left of the crop: removed
        box((10, 5, 30, 25), category_id=2),   # straddles the left edge: clipped
        box((70, 0, 90, 10), category_id=4),   # right of the crop: removed
        box((25, 3, 35, 13), category_id=5),   # inside: shifted
    ])
    out = plain_mapper([T.CropTransform(20, 0, 40, 30)])(rec)
    assert tuple(out["image"].shape) == (3, 30, 40)
    assert out["instances"].gt_classes.tolist() == [2, 5]
    assert out["instances"].gt_boxes.tensor.tolist() == [[0, 5, 10, 25], [5, 3, 15, 13]]


@pytest.mark.parametrize("annotations", [[], None])
def test_image_without_objects_gives_empty_instances(tmp_path, annotations):
    rec = record(write_image(tmp_path / "e.png", 20, 30), 20, 30)
    if annotations is None:
        del rec["annotations"]
    instances = DetrDatasetMapper(small_cfg(), is_train=True)(rec)["instances"]
    assert len(instances) == 0
    assert tuple(instances.gt_boxes.tensor.shape) == (0, 4)
    assert tuple(instances.gt_classes.shape) == (0,)


def test_rgb_channel_order_and_dtype(tmp_path):
    rec = record(write_image(tmp_path / "red.png", 10, 12, bgr=(0, 0, 255)), 10, 12)
    image = plain_mapper([])(rec)["image"]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 10, 12)
    assert (image[0] == 255).all() and (image[1:] == 0).all()


def test_input_record_not_modified(wide_record):
    before = repr(wide_record)
    plain_mapper([T.RandomFlip(prob=1.0)])(wide_record)
    assert repr(wide_record) == before


def test_missing_file_error_names_file_and_record(tmp_path):
    missing = str(tmp_path / "nowhere" / "missing_0042.jpg")
    with pytest.raises(FileNotFoundError, match="missing_0042.jpg") as info:
        plain_mapper([])(record(missing, 10, 10))
    assert "image_id 7" in str(info.value)


def test_unreadable_file_error_names_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(OSError, match="broken.jpg"):
        plain_mapper([])(record(str(path), 10, 10))


def test_random_apply_list_probability_bounds():
    with pytest.raises(ValueError):
        RandomApplyList([T.RandomFlip()], prob=1.5)
    aug_input = T.AugInput(np.zeros((4, 6, 3), np.uint8))
    assert isinstance(RandomApplyList([T.RandomFlip(prob=1.0)], prob=0.0)(aug_input),
                      T.NoOpTransform)


def detectron2_instances(annotations, transforms, image_shape):
    """The reference: detectron2's per-annotation transform, instances and empty-box filter."""
    annos = []
    for anno in copy.deepcopy(annotations):
        if anno.get("iscrowd", 0) == 0:
            anno["bbox"] = [float(v) for v in anno["bbox"]]
            annos.append(utils.transform_instance_annotations(anno, transforms, image_shape))
    return utils.filter_empty_instances(utils.annotations_to_instances(annos, image_shape))


def random_annotations(rng, width, height, count):
    """Integer and fractional boxes in XYXY_ABS / XYWH_ABS, some outside the image or empty."""
    annotations = []
    for _ in range(count):
        x0, y0 = rng.uniform(-0.2, 1.1) * width, rng.uniform(-0.2, 1.1) * height
        w, h = rng.choice([0.0, rng.uniform(0, 0.6) * width]), rng.uniform(0, 0.6) * height
        values = [x0, y0, w, h]
        if rng.random() < 0.3:
            values = [int(round(v)) for v in values]
        if rng.random() < 0.5:
            annotations.append(box(values, category_id=int(rng.integers(0, 5)), mode=BoxMode.XYWH_ABS,
                                   iscrowd=int(rng.random() < 0.1)))
        else:
            annotations.append(box([values[0], values[1], values[0] + values[2], values[1] + values[3]],
                                   category_id=int(rng.integers(0, 5))))
    return annotations


@pytest.mark.parametrize("seed", range(40))
def test_batched_box_transform_equals_detectron2_per_annotation(seed):
    rng = np.random.default_rng(seed)
    np.random.seed(seed)
    height, width = int(rng.integers(20, 300)), int(rng.integers(20, 300))
    image = np.zeros((height, width, 3), np.uint8)
    augs = T.AugmentationList([
        T.RandomFlip(prob=0.5, horizontal=seed % 2 == 0, vertical=seed % 2 == 1),
        RandomApplyList([T.ResizeShortestEdge((15, 40, 77), sample_style="choice"),
                         T.RandomCrop("absolute_range", (10, 50))], prob=0.7),
        T.ResizeShortestEdge((16, 96, 201), 333, "choice"),
    ])
    aug_input = T.AugInput(image)
    transforms = augs(aug_input)
    shape = aug_input.image.shape[:2]
    annotations = random_annotations(rng, width, height, int(rng.integers(0, 12)))
    before = repr(annotations)
    ours = DetrDatasetMapper._annotations_to_instances(annotations, transforms, shape)
    reference = detectron2_instances(annotations, transforms, shape)
    assert repr(annotations) == before
    assert ours.image_size == reference.image_size
    assert torch.equal(ours.gt_boxes.tensor, reference.gt_boxes.tensor)
    assert ours.gt_boxes.tensor.dtype == torch.float32
    assert torch.equal(ours.gt_classes, reference.gt_classes)


def test_box_conversion_equals_detectron2_for_every_absolute_mode():
    rng = np.random.default_rng(0)
    annotations = [box(rng.uniform(0, 50, 4).tolist(), mode=BoxMode.XYWH_ABS),
                   box([3, 4, 10, 20], mode=BoxMode.XYWH_ABS),
                   box((rng.uniform(0, 50, 4) + [0, 0, 50, 50]).tolist()),
                   box([20.3, 30.7, 10.1, 5.9, 33.0], mode=BoxMode.XYWHA_ABS)]
    expected = [BoxMode.convert([float(v) for v in a["bbox"]], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in annotations]
    boxes = annotation_boxes_xyxy(annotations)
    assert boxes.dtype == np.float64 and boxes.shape == (4, 4)
    assert boxes.tolist() == expected
    assert annotation_boxes_xyxy([]).shape == (0, 4)
    with pytest.raises(AssertionError, match="Relative mode"):
        annotation_boxes_xyxy([box([0.1, 0.1, 0.5, 0.5], mode=BoxMode.XYXY_REL)])


def test_transform_boxes_clips_to_image():
    boxes = np.array([[-5.0, 2.0, 30.0, 50.0], [1.5, 2.5, 3.5, 4.5]])
    out = transform_boxes(boxes, T.TransformList([T.HFlipTransform(20)]), (40, 20))
    assert out.tolist() == [[0.0, 2.0, 20.0, 40.0], [16.5, 2.5, 18.5, 4.5]]
    assert transform_boxes(np.zeros((0, 4)), T.TransformList([]), (4, 4)).shape == (0, 4)


def test_output_is_a_copy_that_shares_nothing_modified(wide_record):
    out = plain_mapper([T.RandomFlip(prob=1.0)])(wide_record)
    out["file_name"] = "other.png"
    assert wide_record["file_name"] != "other.png" and "annotations" in wide_record
    assert "image" not in wide_record and "instances" not in wide_record
