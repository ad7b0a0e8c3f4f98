"""With MODEL.MASK_ON, DetrDatasetMapper gives gt_masks (from polygons and from COCO RLE)
that follow the image and the boxes through flip, crop and resize; an instance a crop
empties goes, box and mask together. Real image files, real detectron2 transforms."""
import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, PolygonMasks

import detr_d2
from detr_d2.data import DatasetError, DetrDatasetMapper

HEIGHT, WIDTH = 30, 40


def write_image(path):
    cv2.imwrite(str(path), np.full((HEIGHT, WIDTH, 3), 90, np.uint8))
    return str(path)


def raster(x0, y0, x1, y1):
    """uint8 [HEIGHT, WIDTH] with ones on columns x0..x1-1, rows y0..y1-1."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def polygon_annotation(x0, y0, x1, y1, category_id=1):
    return {"bbox": [x0, y0, x1, y1], "bbox_mode": BoxMode.XYXY_ABS, "category_id": category_id, "iscrowd": 0,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}


def rle_annotation(mask, category_id=2, compressed=True):
    rle = mask_util.encode(np.asfortranarray(mask))
    if not compressed:  # COCO's uncompressed form: run lengths as a list, column-major
        flat = mask.flatten(order="F")
        changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        rle = {"size": [HEIGHT, WIDTH], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
    ys, xs = np.nonzero(mask)
    return {"bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
            "bbox_mode": BoxMode.XYXY_ABS, "category_id": category_id, "iscrowd": 0, "segmentation": rle}


def record(path, annotations):
    return {"file_name": write_image(path), "height": HEIGHT, "width": WIDTH, "image_id": 3,
            "annotations": annotations}


def mask_mapper(augmentations, mask_format="polygon"):
    return DetrDatasetMapper(True, augmentations=augmentations, image_format="RGB", mask_format=mask_format)


def assert_masks_fill_their_boxes(instances):
    """Each (rectangle/RLE-shape) mask lies inside its box and touches all four sides."""
    masks = instances.gt_masks.tensor
    for mask, (x0, y0, x1, y1) in zip(masks, instances.gt_boxes.tensor.round().int().tolist()):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1) == (x0, y0, x1, y1)


def test_flip_crop_resize_move_polygon_and_rle_masks_and_a_cut_out_instance_goes(tmp_path):
    ellipse = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.ellipse(ellipse, (28, 18), (6, 5), 0, 0, 360, 1, -1)
    annotations = [polygon_annotation(2, 3, 12, 20), rle_annotation(ellipse),
                   polygon_annotation(34, 2, 39, 8, category_id=3)]  # flipped to x 1..6: cropped away
    transforms = [T.HFlipTransform(WIDTH), T.CropTransform(8, 0, 30, 24), T.ResizeTransform(24, 30, 48, 60)]
    instances = mask_mapper(transforms)(record(tmp_path / "a.png", annotations))["instances"]
    assert instances.gt_classes.tolist() == [1, 2]  # class 3 went with its box
    assert isinstance(instances.gt_masks, BitMasks) and instances.gt_masks.tensor.shape == (2, 48, 60)
    expected = [raster(2, 3, 12, 20), ellipse]
    for mask, source in zip(instances.gt_masks.tensor, expected):
        moved = source[:, ::-1][0:24, 8:38].repeat(2, axis=0).repeat(2, axis=1)  # flip, crop, 2x nearest
        assert np.array_equal(mask.numpy(), moved.astype(bool))
    assert_masks_fill_their_boxes(instances)


def test_without_crop_polygons_stay_exact_polygon_masks(tmp_path):
    transforms = [T.HFlipTransform(WIDTH), T.ResizeTransform(HEIGHT, WIDTH, 60, 80)]
    instances = mask_mapper(transforms)(record(tmp_path / "p.png", [polygon_annotation(2, 3, 12, 20)]))["instances"]
    assert isinstance(instances.gt_masks, PolygonMasks)
    polygon = instances.gt_masks.polygons[0][0].reshape(-1, 2)
    assert np.allclose(polygon, [[76, 6], [56, 6], [56, 40], [76, 40]])  # x -> 2 (40 - x), y -> 2 y
    assert instances.gt_boxes.tensor.tolist() == [[56.0, 6.0, 76.0, 40.0]]


def test_uncompressed_rle_and_bitmask_format(tmp_path):
    mask = raster(5, 6, 15, 20)
    annotations = [rle_annotation(mask, compressed=False), polygon_annotation(20, 2, 30, 12)]
    instances = mask_mapper([], mask_format="bitmask")(record(tmp_path / "r.png", annotations))["instances"]
    assert isinstance(instances.gt_masks, BitMasks)
    assert np.array_equal(instances.gt_masks.tensor[0].numpy(), mask.astype(bool))
    assert np.array_equal(instances.gt_masks.tensor[1].numpy(), raster(20, 2, 30, 12).astype(bool))


def test_mask_format_follows_mask_on():
    cfg = get_cfg()
    detr_d2.add_detr_config(cfg)
    assert DetrDatasetMapper(cfg, is_train=True).mask_format is None
    cfg.MODEL.MASK_ON = True
    assert DetrDatasetMapper(cfg, is_train=True).mask_format == "polygon"


def test_an_annotation_without_segmentation_is_a_dataset_error_naming_the_image(tmp_path):
    annotation = polygon_annotation(2, 3, 12, 20)
    del annotation["segmentation"]
    annotation["id"] = 41
    with pytest.raises(DatasetError, match=r"m\.png \(image_id 3\).*ids \[41\].*MODEL.MASK_ON False"):
        mask_mapper([])(record(tmp_path / "m.png", [annotation]))
