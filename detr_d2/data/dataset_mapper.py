"""``DetrDatasetMapper``: reference DETR's data augmentation on detectron2 dataset dicts.

Training augmentation (as the reference DETR): random flip; then, with probability
``INPUT.CROP.PROBABILITY`` (when ``INPUT.CROP.ENABLED``), resize the shortest edge to one
of ``INPUT.CROP.PRE_RESIZE_SIZES`` (no longest-edge limit) and take a random crop
(``INPUT.CROP.TYPE`` / ``INPUT.CROP.SIZE``); then resize the shortest edge to one of
``INPUT.MIN_SIZE_TRAIN``, the longest edge at most ``INPUT.MAX_SIZE_TRAIN``.
Test: resize the shortest edge to ``INPUT.MIN_SIZE_TEST``, longest at most
``INPUT.MAX_SIZE_TEST``.

With ``MODEL.MASK_ON`` the instances also get ``gt_masks`` from the annotations'
"segmentation" (polygons or COCO RLE), moved by the same flip, crop and resize as the
boxes and dropped together with a box a crop empties. ``INPUT.MASK_FORMAT`` "polygon" gives
``PolygonMasks`` (exact polygons) for images without a crop whose annotations are all
polygons, ``BitMasks`` otherwise (a cropped polygon is rasterised first: clipping polygons
would need shapely); "bitmask" always gives ``BitMasks``.

A COCO-panoptic record ("pan_seg_file_name", "segments_info"; ``coco_panoptic``) gets its
instances from the panoptic PNG instead (``panoptic_targets``): every segment, thing or
stuff, crowd or not, is a target (contiguous class, box from its mask, ``gt_masks`` with
MODEL.MASK_ON); the PNG's id map is transformed with the image (nearest), void pixels
belong to no target.

Images are read with ``image_io.read_image`` (EXIF orientation applied, grayscale /
palette / RGBA / 16-bit files converted to ``INPUT.FORMAT``); a file that cannot be read
or whose size differs from its record raises ``BadImageError`` naming the file, image id
and dataset (records carry "dataset_name" when loaded by the Trainer).
"""
import logging

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks, polygons_to_bitmask

from detr_d2.data.coco_registration import DatasetError
from detr_d2.data.image_io import BadImageError, ImageNotFoundError, read_image
from detr_d2.data.panoptic_targets import panoptic_index_map, panoptic_instances
from detr_d2.data.transforms import RandomApplyList

__all__ = ["DetrDatasetMapper", "annotation_boxes_xyxy", "annotation_mask", "build_detr_augmentation",
           "transform_boxes", "transform_masks"]

# detectron2's ``filter_empty_instances``: a box is empty when its width or height is at most this.
EMPTY_BOX_THRESHOLD = 1e-5


def _build_flip(cfg):
    """The flip of ``INPUT.RANDOM_FLIP`` ("horizontal", "vertical"), p=0.5; None for "none"."""
    if cfg.INPUT.RANDOM_FLIP == "none":
        return None
    return T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                        vertical=cfg.INPUT.RANDOM_FLIP == "vertical")


def _build_random_crop(cfg):
    """With ``CROP.PROBABILITY``: resize shortest edge to one of ``PRE_RESIZE_SIZES``, crop."""
    crop = cfg.INPUT.CROP
    return RandomApplyList(
        [T.ResizeShortestEdge(crop.PRE_RESIZE_SIZES, sample_style="choice"),
         T.RandomCrop(crop.TYPE, crop.SIZE)],
        prob=crop.PROBABILITY,
    )


def build_detr_augmentation(cfg, is_train):
    """The list of detectron2 augmentations ``DetrDatasetMapper`` applies, from ``cfg.INPUT``.

    Returns:
        list[Augmentation]: train: [flip (unless RANDOM_FLIP "none"), random pre-resize +
        crop (if CROP.ENABLED), multi-scale resize]; test: [resize].
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    augs = [_build_flip(cfg), _build_random_crop(cfg) if cfg.INPUT.CROP.ENABLED else None]
    augs.append(T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                     cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING))
    return [aug for aug in augs if aug is not None]


def annotation_boxes_xyxy(annotations):
    """The "bbox" of each annotation in XYXY_ABS, as detectron2's ``BoxMode.convert`` gives it.

    Args:
        annotations (list[dict]): each with "bbox" (4 numbers; 5 for XYWHA_ABS) in
            "bbox_mode" (an absolute ``BoxMode``).

    Returns:
        ndarray: float64 of shape (N, 4), XYXY absolute pixels, in the order of
        ``annotations``. Coordinates are taken as floats: detectron2 transforms integer
        boxes in integer arrays, truncating every scaled coordinate (a 2000-px offset
        scaled by 96/9000 would become 21, not 21.33). Boxes in another mode are converted
        like ``BoxMode.convert`` converts one list box, in torch's default float dtype
        (float32), so the result equals detectron2's per-annotation conversion.
    """
    boxes = np.zeros((len(annotations), 4))
    modes = [anno["bbox_mode"] for anno in annotations]
    for mode in set(modes):
        rows = [i for i, m in enumerate(modes) if m == mode]
        values = [[float(v) for v in annotations[i]["bbox"]] for i in rows]
        if mode == BoxMode.XYXY_ABS:
            boxes[rows] = values
        else:
            boxes[rows] = BoxMode.convert(torch.tensor(values), mode, BoxMode.XYXY_ABS).numpy()
    return boxes


def transform_boxes(boxes, transforms, image_shape):
    """``boxes`` through ``transforms``, clipped to the image, as detectron2 transforms one box.

    Row for row what ``detection_utils.transform_instance_annotations`` gives for one
    annotation: ``transforms.apply_box``, then clipped to [0, width] x [0, height].

    Args:
        boxes (ndarray): float64 of shape (N, 4), XYXY absolute pixels of the input image.
        transforms (TransformList): the transforms applied to the image.
        image_shape (tuple[int, int]): (height, width) of the transformed image.

    Returns:
        ndarray: float64 of shape (N, 4), XYXY absolute pixels of the transformed image.
    """
    if len(boxes) == 0:
        return boxes
    height, width = image_shape
    return np.minimum(transforms.apply_box(boxes).clip(min=0), [width, height, width, height])


def annotation_mask(annotation, height, width):
    """uint8 [height, width] (0/1) mask of one annotation's "segmentation": a list of
    polygons (flat x, y lists) or a COCO RLE (compressed, or uncompressed with a list of
    counts), at the size of the image the annotation describes."""
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        return polygons_to_bitmask(segmentation, height, width).astype(np.uint8)
    if isinstance(segmentation["counts"], list):
        segmentation = mask_util.frPyObjects(segmentation, height, width)
    return mask_util.decode(segmentation)


def _has_crop(transforms):
    return any(isinstance(t, T.CropTransform) for t in transforms.transforms)


def transform_masks(annotations, transforms, source_shape, image_shape, mask_format):
    """The annotations' masks moved by ``transforms`` (as the image was).

    Args:
        annotations (list[dict]): each with "segmentation" (polygons or RLE) of an image of
            ``source_shape`` (height, width).
        transforms (TransformList): the transforms applied to the image.
        image_shape (tuple[int, int]): (height, width) of the transformed image.
        mask_format (str): "polygon" or "bitmask" (INPUT.MASK_FORMAT).

    Returns:
        PolygonMasks (format "polygon", no crop, every segmentation a polygon list: exact
        transformed polygons) or BitMasks [N, height, width] bool.
    """
    polygons_only = all(isinstance(anno["segmentation"], list) for anno in annotations)
    if mask_format == "polygon" and polygons_only and not _has_crop(transforms):
        return PolygonMasks([
            [p.reshape(-1) for p in transforms.apply_polygons([np.asarray(p).reshape(-1, 2)
                                                               for p in anno["segmentation"]])]
            for anno in annotations])
    masks = [transforms.apply_segmentation(annotation_mask(anno, *source_shape)) for anno in annotations]
    if not masks:
        return BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
    return BitMasks(torch.from_numpy(np.stack(masks)).to(torch.bool))


class DetrDatasetMapper:
    """Map one detectron2 dataset dict to DETR's input: augmented image and its boxes.

    Input: a dict with "file_name", "height", "width", "image_id" and (training)
    "annotations", each with "bbox" in "bbox_mode", "category_id", "iscrowd".

    Output: a shallow copy of the dict (height/width/file_name/image_id kept, i.e. the
    original image size, to which detectron2 models rescale their predictions; nested values
    such as "annotations" are read, never modified) plus

    * "image": uint8 tensor of shape (C, H, W), H x W the augmented size, channels in
      ``image_format`` order (C = 3 for "RGB"/"BGR").
    * "instances" (training, or ``with_instances``): ``Instances`` of image size (H, W) with ``gt_boxes``
      (``Boxes``, shape (N, 4), XYXY in absolute pixels of the augmented image, clipped
      to it) and ``gt_classes`` (int64 tensor of shape (N,)), with ``mask_format`` also
      ``gt_masks`` (``transform_masks``). Crowd annotations are dropped and so are boxes
      left empty by a crop (with their masks); N may be 0 (boxes of shape (0, 4)).

    At test time "annotations" are removed and there is no "instances", unless
    ``with_instances`` (evaluation against the ground truth) makes them as in training.
    """

    @configurable
    def __init__(self, is_train, *, augmentations, image_format, with_instances=None, mask_format=None):
        """
        Args:
            is_train (bool): training (annotations become "instances") or inference
                (annotations are dropped).
            augmentations (list[Augmentation or Transform]): applied in order to the image
                and its boxes, e.g. ``build_detr_augmentation(cfg, is_train)``.
            image_format (str): channel order of "image", any format of
                ``image_io.read_image`` ("RGB" for DETR).
            with_instances (bool or None): make "instances" of the annotations; None: in
                training only. True at test time gives evaluation its ground truth (a
                record without "annotations", e.g. of an unlabelled test set, gets none).
            mask_format (str or None): "polygon" / "bitmask" to give training instances
                ``gt_masks``; None (no masks) without MODEL.MASK_ON.
        """
        self.is_train = is_train
        self.with_instances = is_train if with_instances is None else with_instances
        self.mask_format = mask_format
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(
            f"[DetrDatasetMapper] Augmentations used in {mode}: {self.augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train=True, with_instances=None):
        """Keys: INPUT.FORMAT, MODEL.MASK_ON, INPUT.MASK_FORMAT and those of
        ``build_detr_augmentation``."""
        return {
            "is_train": is_train,
            "with_instances": with_instances,
            "augmentations": build_detr_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "mask_format": cfg.INPUT.MASK_FORMAT if cfg.MODEL.MASK_ON else None,
        }

    @staticmethod
    def _where(dataset_dict):
        """The record's file, image id and (if known) dataset, for messages."""
        dataset = dataset_dict.get("dataset_name")
        of_dataset = f" of dataset {dataset!r}" if dataset else ""
        return f"{dataset_dict['file_name']} (image_id {dataset_dict.get('image_id')!r}{of_dataset})"

    def _read_image(self, dataset_dict):
        """HWC uint8 image of the record (``image_io.read_image``: EXIF orientation applied,
        any pixel format to ``image_format``), of the size the record says.

        Raises:
            BadImageError (ImageNotFoundError for a missing file) naming the file, the
            image id and the dataset, and what to do.
        """
        where = self._where(dataset_dict)
        try:
            image = read_image(dataset_dict["file_name"], format=self.image_format)
        except ImageNotFoundError as e:
            raise ImageNotFoundError(
                f"Image file not found: {where}; check DATASETS and the image root the "
                "dataset was registered with", e.reason) from e
        except BadImageError as e:
            raise BadImageError(f"Cannot read image {where}: {e.reason}. Replace the file or "
                                "remove the image from the dataset's annotations.", e.reason) from e
        try:
            utils.check_image_size(dataset_dict, image)
        except utils.SizeMismatchError as e:
            raise BadImageError(f"Image {where} is {image.shape[1]}x{image.shape[0]} pixels (width x "
                                f"height, after EXIF orientation) but its record says "
                                f"{dataset_dict.get('width')}x{dataset_dict.get('height')}; fix width/"
                                "height in the annotation file.", str(e)) from e
        return image

    @staticmethod
    def _annotations_to_instances(annotations, transforms, image_shape, source_shape=None, mask_format=None):
        """Instances of the non-crowd boxes, transformed, clipped to ``image_shape``, non-empty,
        and with ``mask_format`` their masks (``transform_masks`` from ``source_shape``).

        The same boxes and classes as detectron2's ``transform_instance_annotations`` per
        annotation, ``annotations_to_instances`` and ``filter_empty_instances``, with all
        boxes of the image transformed as one array. Keypoints are ignored. An instance is
        kept by its box, as the reference crop keeps it, and its mask goes with it.
        """
        annos = [anno for anno in annotations if anno.get("iscrowd", 0) == 0]
        boxes = Boxes(transform_boxes(annotation_boxes_xyxy(annos), transforms, image_shape))
        classes = torch.tensor([int(anno["category_id"]) for anno in annos], dtype=torch.int64)
        keep = boxes.nonempty(threshold=EMPTY_BOX_THRESHOLD)
        instances = Instances(image_shape, gt_boxes=boxes[keep], gt_classes=classes[keep])
        if mask_format:
            instances.gt_masks = transform_masks(annos, transforms, source_shape, image_shape, mask_format)[keep]
        return instances

    def _check_segmentations(self, dataset_dict, annotations):
        """With masks, every non-crowd annotation needs a "segmentation" (DatasetError)."""
        without = [anno.get("id") for anno in annotations
                   if anno.get("iscrowd", 0) == 0 and "segmentation" not in anno]
        if self.mask_format and without:
            raise DatasetError(f"MODEL.MASK_ON needs a 'segmentation' in every annotation, but "
                               f"{self._where(dataset_dict)} has annotations without one (ids {without[:5]}); "
                               "add their masks or train boxes only (MODEL.MASK_ON False)")

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): one record in detectron2's dataset format (not modified).

        Returns:
            dict: the record with "image" (uint8, (C, H, W)) and, in training (or with
            ``with_instances``), "instances" (gt_boxes XYXY absolute pixels of the augmented image, gt_classes).
        """
        dataset_dict = dict(dataset_dict)  # nothing nested is modified: a shallow copy will do
        image = self._read_image(dataset_dict)
        source_shape = image.shape[:2]
        panoptic = self.with_instances and "pan_seg_file_name" in dataset_dict
        aug_input = T.AugInput(image, sem_seg=panoptic_index_map(dataset_dict, source_shape) if panoptic else None)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if panoptic:
            dataset_dict["instances"] = panoptic_instances(dataset_dict["segments_info"], aug_input.sem_seg,
                                                           with_masks=bool(self.mask_format))
            return dataset_dict
        labelled = "annotations" in dataset_dict
        annotations = dataset_dict.pop("annotations", [])
        if self.with_instances and (labelled or self.is_train):
            self._check_segmentations(dataset_dict, annotations)
            dataset_dict["instances"] = self._annotations_to_instances(
                annotations, transforms, image.shape[:2], source_shape, self.mask_format)
        return dataset_dict
