#!/usr/bin/env python
"""Pretrain a detectron2 backbone with a throwaway CenterNet-style dense head.

DETR trained from scratch on a CPU stays on its early plateau; a backbone that already
finds objects lets it converge in minutes (DESIGN.md section 5). This tool trains the
backbone of a DETR config (e.g. the tiny CNN of configs/shapes/Base-Shapes.yaml) on a
COCO-json dataset to predict, on its output feature map (stride s):

* a centre heatmap per class (or one class-agnostic channel with ``--class-agnostic``):
  Gaussians at the box centres, sigma = max(0.5, 0.15 * box side / s) per axis, peak
  1 at the cell holding the centre; CenterNet focal loss (alpha 2, beta 4) normalised by
  the number of objects;
* four box values at each centre cell: width / image width, height / image height and
  the centre's offset (x, y) inside its cell (in cells); 5 x L1, averaged over objects
  and values.

Head: 3x3 conv to 128 channels, ReLU, 1x1 conv to (heatmap channels + 4); heatmap bias
-2.19 (initial score 0.1). AdamW (lr 2e-3, weight decay 1e-4), linear warm-up over 100
iterations, then cosine decay to 0 over the run; the run ends at ``--max-iter``
iterations or after ``--max-minutes``, whichever comes first (the cosine follows
whichever is further along). The backbone trains with trainable BatchNorm (the config's
MODEL.TINY_CNN.NORM and MODEL.BACKBONE.FREEZE_AT are overridden to "BN" and 0).

Evaluation (every ``--eval-period`` iterations and at the end): decode each image's
heatmap peaks (3x3 max-pool, top ``--top-k``) into boxes and score them with
pycocotools' COCOeval (bbox) against the val json; logged as "dense head AP".

Output: ``--output`` (default output/shapes_backbone/backbone.pth), written atomically
at each evaluation: ``{"model": backbone state dict, "pretrain": {...run facts}}`` with
the keys the Detr model of the same config gives its backbone (``backbone.body.<name>``,
checked at start-up) and no ``num_batches_tracked``, so detectron2's
DetectionCheckpointer loads it as MODEL.WEIGHTS (the DETR keys it lacks are reported
as missing) also into a FrozenBN backbone. A log is written beside it.

Example (the shapes demo)::

    python datasets/prepare_shapes.py --preset pretrain --splits train:4000,val:200
    python tools/pretrain_backbone.py --config-file configs/shapes/Base-Shapes.yaml \
        --dataset-dir datasets/shapes_pretrain --max-minutes 10 \
        --output output/shapes_backbone/backbone.pth
"""
import argparse
import contextlib
import io
import logging
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import detr_d2  # noqa: F401  (first: applies the compat fixes, registers the backbones)
from detectron2.config import get_cfg
from detectron2.data import detection_utils
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.logger import setup_logger
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_d2 import add_detr_config
from detr_d2.checkpoint import atomic_torch_save
from detr_d2.engine import merge_config
from detr_d2.modeling.tiny_backbone import add_tiny_cnn_config

logger = logging.getLogger("detr_d2.pretrain_backbone")

HEAD_CHANNELS = 128
HEATMAP_PRIOR_BIAS = -2.19  # sigmoid(-2.19) ~ 0.1
FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0
BOX_WEIGHT = 5.0
NUM_BOX_VALUES = 4  # width / image width, height / image height, offset x, offset y (cells)
DETR_BACKBONE_PREFIX = "backbone.body."


# --------------------------------------------------------------------------- data
class CocoImages:
    """A COCO-json dataset held in memory.

    ``images[i]``: uint8 array [H, W, 3] in the config's INPUT.FORMAT channel order;
    ``boxes[i]``: float32 [n, 4] xyxy absolute pixels; ``labels[i]``: int64 [n] contiguous
    class indices (0..K-1 in the order of sorted category ids); ``image_ids[i]``: COCO id.
    Crowd annotations and empty boxes are left out.
    """

    def __init__(self, json_file, image_root, image_format):
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(json_file)
        self.category_ids = sorted(self.coco.getCatIds())
        index_of = {cat_id: i for i, cat_id in enumerate(self.category_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.image_ids = sorted(self.coco.getImgIds())
        self.images, self.boxes, self.labels = [], [], []
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            self.images.append(detection_utils.read_image(os.path.join(image_root, info["file_name"]),
                                                          format=image_format))
            anns = [a for a in self.coco.imgToAnns[image_id]
                    if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=np.float32).reshape(-1, 4)
            self.boxes.append(boxes)
            self.labels.append(np.array([index_of[a["category_id"]] for a in anns], dtype=np.int64))

    def __len__(self):
        return len(self.images)


def paths_of_split(dataset_dir, split):
    """(json, image folder) of a split laid out as datasets/prepare_shapes.py writes it."""
    return (os.path.join(dataset_dir, "annotations", f"{split}.json"),
            os.path.join(dataset_dir, "images", split))


def flip_horizontally(image, boxes):
    """Mirror an image [H, W, 3] and its xyxy boxes."""
    width = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return image[:, ::-1], flipped


def normalized_batch(images, pixel_mean, pixel_std, size_divisibility):
    """uint8 [H, W, 3] images -> float [B, 3, H', W'] normalised, zero-padded bottom/right
    to a common size (a multiple of ``size_divisibility``)."""
    height = max(image.shape[0] for image in images)
    width = max(image.shape[1] for image in images)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    batch = torch.zeros(len(images), 3, height, width)
    for i, image in enumerate(images):
        tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
        batch[i, :, :image.shape[0], :image.shape[1]] = (tensor - pixel_mean) / pixel_std
    return batch


# ------------------------------------------------------------------------ targets
def dense_targets(boxes, labels, image_size, feature_size, stride, num_heatmaps):
    """CenterNet targets of one image.

    Args:
        boxes: [n, 4] xyxy absolute pixels; labels: [n] heatmap channel of each box.
        image_size: (H, W) of the unpadded image; feature_size: (h, w) of the feature map.
    Returns:
        heatmap [num_heatmaps, h, w] float32 (Gaussians, exactly 1 at each centre cell),
        centres [n, 2] int64 (cell row, column), values [n, 4] float32 (w / W, h / H,
        x offset and y offset of the centre inside its cell, in cells).
    """
    h, w = feature_size
    heatmap = np.zeros((num_heatmaps, h, w), dtype=np.float32)
    if len(boxes) == 0:
        return heatmap, np.zeros((0, 2), dtype=np.int64), np.zeros((0, NUM_BOX_VALUES), np.float32)
    box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 / stride  # centre in cell units
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 / stride
    col = np.clip(np.floor(cx), 0, w - 1).astype(np.int64)
    row = np.clip(np.floor(cy), 0, h - 1).astype(np.int64)
    sigma_x = np.maximum(0.5, 0.15 * box_w / stride)
    sigma_y = np.maximum(0.5, 0.15 * box_h / stride)
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    for i in range(len(boxes)):
        gx = np.exp(-((xs - cx[i]) ** 2) / (2 * sigma_x[i] ** 2))
        gy = np.exp(-((ys - cy[i]) ** 2) / (2 * sigma_y[i] ** 2))
        channel = heatmap[labels[i]]
        np.maximum(channel, gy[:, None] * gx[None, :], out=channel)
        channel[row[i], col[i]] = 1.0
    values = np.stack([box_w / image_size[1], box_h / image_size[0], cx - col, cy - row], axis=1)
    return heatmap, np.stack([row, col], axis=1), values.astype(np.float32)


def batch_targets(boxes_list, labels_list, image_sizes, feature_size, stride, num_heatmaps):
    """Stacked ``dense_targets``: heatmaps [B, K, h, w], indices (batch, row, col) [3, N],
    values [N, 4], over the N objects of the batch."""
    heatmaps, indices, values = [], [], []
    for b, (boxes, labels, size) in enumerate(zip(boxes_list, labels_list, image_sizes)):
        heatmap, centres, box_values = dense_targets(boxes, labels, size, feature_size, stride,
                                                     num_heatmaps)
        heatmaps.append(heatmap)
        indices.append(np.concatenate([np.full((len(centres), 1), b), centres], axis=1))
        values.append(box_values)
    return (torch.from_numpy(np.stack(heatmaps)),
            torch.from_numpy(np.concatenate(indices).T.copy()),
            torch.from_numpy(np.concatenate(values)))


# ---------------------------------------------------------------------- model, loss
class DenseHead(nn.Module):
    """3x3 conv -> ReLU -> 1x1 conv; forward(features [B, C, h, w]) ->
    (heatmap logits [B, K, h, w], box values [B, 4, h, w])."""

    def __init__(self, in_channels, num_heatmaps):
        super().__init__()
        self.num_heatmaps = num_heatmaps
        self.hidden = nn.Conv2d(in_channels, HEAD_CHANNELS, 3, padding=1)
        self.out = nn.Conv2d(HEAD_CHANNELS, num_heatmaps + NUM_BOX_VALUES, 1)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():
            self.out.bias[:num_heatmaps] = HEATMAP_PRIOR_BIAS

    def forward(self, features):
        out = self.out(F.relu(self.hidden(features)))
        return out[:, :self.num_heatmaps], out[:, self.num_heatmaps:]


class DenseDetector(nn.Module):
    """Backbone + dense head; forward(images [B, 3, H, W]) -> the head's outputs."""

    def __init__(self, backbone, in_feature, num_heatmaps):
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        shape = backbone.output_shape()[in_feature]
        self.stride = shape.stride
        self.head = DenseHead(shape.channels, num_heatmaps)

    def forward(self, images):
        return self.head(self.backbone(images)[self.in_feature])


def centernet_focal_loss(logits, target):
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of peaks."""
    prob = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    pos_loss = -torch.log(prob) * (1 - prob) ** FOCAL_ALPHA * positive
    neg_loss = -torch.log(1 - prob) * prob ** FOCAL_ALPHA * (1 - target) ** FOCAL_BETA * (1 - positive)
    return (pos_loss.sum() + neg_loss.sum()) / positive.sum().clamp(min=1)


def dense_losses(heatmap_logits, box_map, heatmaps, indices, values):
    """{"loss_heatmap": focal loss, "loss_box": 5 x mean L1 of the box values at centres}."""
    b, row, col = indices
    predicted = box_map.permute(0, 2, 3, 1)[b, row, col]  # [N, 4]
    loss_box = F.l1_loss(predicted, values) if len(values) else box_map.sum() * 0
    return {"loss_heatmap": centernet_focal_loss(heatmap_logits, heatmaps),
            "loss_box": BOX_WEIGHT * loss_box}


# ------------------------------------------------------------------------ decoding
def decode_detections(heatmap_logits, box_map, image_sizes, stride, top_k):
    """Peaks of each image's heatmaps as boxes.

    Returns per image (boxes [k, 4] xyxy absolute pixels of the unpadded image, scores [k],
    heatmap channels [k]): the ``top_k`` highest local maxima (3x3) over all channels.
    """
    scores = heatmap_logits.sigmoid()
    peaks = scores * (F.max_pool2d(scores, 3, stride=1, padding=1) == scores)
    batch, channels, h, w = peaks.shape
    top_scores, top_index = peaks.flatten(1).topk(min(top_k, channels * h * w), dim=1)
    results = []
    for i, (height, width) in enumerate(image_sizes):
        channel, cell = top_index[i] // (h * w), top_index[i] % (h * w)
        row, col = cell // w, cell % w
        box_w, box_h, off_x, off_y = box_map[i][:, row, col]  # each [k]
        cx, cy = (col + off_x) * stride, (row + off_y) * stride
        bw, bh = box_w.clamp(min=0) * width, box_h.clamp(min=0) * height
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        results.append((boxes, top_scores[i], channel))
    return results


def class_agnostic_coco(coco):
    """A copy of a pycocotools COCO whose annotations all have category 1 ("object")."""
    dataset = dict(coco.dataset)
    dataset["categories"] = [{"id": 1, "name": "object", "supercategory": "object"}]
    dataset["annotations"] = [dict(a, category_id=1) for a in coco.dataset["annotations"]]
    agnostic = COCO()
    agnostic.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        agnostic.createIndex()
    return agnostic


@torch.no_grad()
def evaluate(model, data, pixel_mean, pixel_std, class_agnostic, top_k, batch_size=32,
             gt_coco=None):
    """COCO bbox AP of the dense head on ``data``; returns (stats dict, summary text)."""
    was_training = model.training
    model.eval()
    detections = []
    for start in range(0, len(data), batch_size):
        images = data.images[start:start + batch_size]
        batch = normalized_batch(images, pixel_mean, pixel_std, model.stride)
        heatmap_logits, box_map = model(batch)
        sizes = [image.shape[:2] for image in images]
        for image_id, (boxes, scores, channels) in zip(
                data.image_ids[start:start + batch_size],
                decode_detections(heatmap_logits, box_map, sizes, model.stride, top_k)):
            for box, score, channel in zip(boxes.tolist(), scores.tolist(), channels.tolist()):
                category = 1 if class_agnostic else data.category_ids[channel]
                detections.append({"image_id": image_id, "category_id": category, "score": score,
                                   "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    model.train(was_training)
    gt_coco = gt_coco or data.coco
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}, "no detections"
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        dt_coco = gt_coco.loadRes(detections)
        evaluator = COCOeval(gt_coco, dt_coco, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(evaluator.stats[i]) for i, name in
             enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl"))}
    lines = [line for line in summary.getvalue().splitlines() if "Average" in line]
    return stats, "\n".join(lines)


# ----------------------------------------------------------------------- training
def learning_rate(base_lr, iteration, warmup_iters, progress):
    """Linear warm-up over ``warmup_iters``, then cosine from ``base_lr`` to 0 as
    ``progress`` (fraction of the run, by iterations or time) goes from 0 to 1."""
    warmup = min(1.0, (iteration + 1) / warmup_iters) if warmup_iters > 0 else 1.0
    return base_lr * warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def backbone_checkpoint(backbone, prefix=DETR_BACKBONE_PREFIX):
    """The backbone's state dict under DETR's names, without BN ``num_batches_tracked``
    (which FrozenBN does not have)."""
    return {prefix + name: tensor.detach().clone()
            for name, tensor in backbone.state_dict().items()
            if not name.endswith("num_batches_tracked")}


def check_detr_names(cfg, backbone_state):
    """Raise if the keys/shapes don't match the backbone part of the config's Detr model."""
    detr_state = build_model(cfg).state_dict()
    expected = {k for k in detr_state if k.startswith(DETR_BACKBONE_PREFIX)}
    missing = sorted(expected - backbone_state.keys())
    unknown = sorted(backbone_state.keys() - expected)
    mismatched = sorted(k for k in expected & backbone_state.keys()
                        if detr_state[k].shape != backbone_state[k].shape)
    if missing or unknown or mismatched:
        raise RuntimeError(f"backbone keys do not match the Detr model of the config: missing "
                           f"{missing[:5]}, unexpected {unknown[:5]}, shape mismatch {mismatched[:5]}")


def build_config(args):
    """The DETR config (detr_d2 + tiny CNN keys, file, KEY VALUE opts) used for naming and
    pixel statistics; ``cfg_train`` has the backbone norm made trainable for pretraining."""
    cfg = get_cfg()
    add_detr_config(cfg)
    add_tiny_cnn_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg_train = cfg.clone()
    cfg_train.MODEL.BACKBONE.FREEZE_AT = 0
    if cfg.MODEL.BACKBONE.NAME == "build_tiny_cnn_backbone":
        cfg_train.MODEL.TINY_CNN.NORM = "BN"
    return cfg, cfg_train


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for the method.")
    parser.add_argument("--config-file", default="configs/shapes/Base-Shapes.yaml",
                        help="DETR config whose backbone is pretrained")
    parser.add_argument("--dataset-dir", help="folder with annotations/<split>.json and "
                        "images/<split>/ (as datasets/prepare_shapes.py writes)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--train-json"), parser.add_argument("--train-images")
    parser.add_argument("--val-json"), parser.add_argument("--val-images")
    parser.add_argument("--output", default="output/shapes_backbone/backbone.pth",
                        help="backbone checkpoint to write (a log goes beside it)")
    parser.add_argument("--class-agnostic", action="store_true",
                        help="one 'object' heatmap instead of one per class")
    parser.add_argument("--max-iter", type=int, default=100000)
    parser.add_argument("--max-minutes", type=float, default=10.0,
                        help="stop after this many minutes of training (0: no limit)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-iters", type=int, default=100)
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    parser.add_argument("--eval-period", type=int, default=500,
                        help="evaluate and save every N iterations (0: only at the end)")
    parser.add_argument("--top-k", type=int, default=100, help="detections per image")
    parser.add_argument("--log-period", type=int, default=20)
    parser.add_argument("--num-threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, KEY VALUE pairs (e.g. MODEL.TINY_CNN.WIDTH 48)")
    args = parser.parse_args(argv)
    for split_name in ("train", "val"):
        for kind in ("json", "images"):
            attribute = f"{split_name}_{kind}"
            if getattr(args, attribute) is None:
                if not args.dataset_dir:
                    parser.error(f"give --dataset-dir or --{split_name}-{kind}")
                split = getattr(args, f"{split_name}_split")
                path = paths_of_split(args.dataset_dir, split)[0 if kind == "json" else 1]
                setattr(args, attribute, path)
    return args


def train(args):
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg, cfg_train = build_config(args)
    pixel_mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    pixel_std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)

    backbone = build_backbone(cfg_train)
    check_detr_names(cfg, backbone_checkpoint(backbone))
    start = time.perf_counter()
    train_data = CocoImages(args.train_json, args.train_images, cfg.INPUT.FORMAT)
    val_data = CocoImages(args.val_json, args.val_images, cfg.INPUT.FORMAT)
    num_heatmaps = 1 if args.class_agnostic else len(train_data.category_ids)
    if not args.class_agnostic and train_data.category_ids != val_data.category_ids:
        raise ValueError("train and val json have different categories; use --class-agnostic")
    gt_val = class_agnostic_coco(val_data.coco) if args.class_agnostic else val_data.coco
    logger.info(f"Loaded {len(train_data)} train / {len(val_data)} val images in "
                f"{time.perf_counter() - start:.1f} s; classes {train_data.class_names}, "
                f"{num_heatmaps} heatmap channel(s)")

    model = DenseDetector(backbone, cfg.MODEL.DETR.IN_FEATURE, num_heatmaps)
    model.train()
    logger.info(f"Backbone {cfg.MODEL.BACKBONE.NAME}: "
                f"{sum(p.numel() for p in backbone.parameters())} parameters, "
                f"output {backbone.output_shape()}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def save(iteration, stats):
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        facts = {"iterations": iteration, "minutes": (time.perf_counter() - start_train) / 60,
                 "class_agnostic": bool(args.class_agnostic), "config_file": args.config_file,
                 "train_json": args.train_json, "dense_head_AP": stats["AP"],
                 "dense_head_AP50": stats["AP50"]}
        atomic_torch_save({"model": backbone_checkpoint(backbone), "pretrain": facts}, args.output)
        logger.info(f"Saved the backbone to {args.output}")

    def evaluate_and_save(iteration):
        eval_start = time.perf_counter()
        stats, summary = evaluate(model, val_data, pixel_mean, pixel_std, args.class_agnostic,
                                  args.top_k, gt_coco=gt_val)
        logger.info(f"iter {iteration}: dense head AP {stats['AP']:.4f} AP50 {stats['AP50']:.4f} "
                    f"AP75 {stats['AP75']:.4f} ({'class-agnostic' if args.class_agnostic else 'per class'}"
                    f", eval {time.perf_counter() - eval_start:.1f} s)\n{summary}")
        save(iteration, stats)
        return stats

    max_seconds = args.max_minutes * 60 if args.max_minutes > 0 else float("inf")
    order = rng.permutation(len(train_data))
    cursor, iteration = 0, 0
    start_train = time.perf_counter()
    window = time.perf_counter()
    stats = None
    while True:
        elapsed = time.perf_counter() - start_train
        if iteration >= args.max_iter or elapsed >= max_seconds:
            break
        progress = max(iteration / args.max_iter, elapsed / max_seconds)
        lr = learning_rate(args.lr, iteration, args.warmup_iters, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cursor + args.batch_size > len(order):
            order, cursor = rng.permutation(len(train_data)), 0
        picked = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        images, boxes = [], []
        for i in picked:
            image, image_boxes = train_data.images[i], train_data.boxes[i]
            if not args.no_flip and rng.random() < 0.5:
                image, image_boxes = flip_horizontally(image, image_boxes)
            images.append(image)
            boxes.append(image_boxes)
        labels = [np.zeros_like(train_data.labels[i]) if args.class_agnostic else train_data.labels[i]
                  for i in picked]
        batch = normalized_batch(images, pixel_mean, pixel_std, model.stride)
        heatmap_logits, box_map = model(batch)
        targets = batch_targets(boxes, labels, [im.shape[:2] for im in images],
                                heatmap_logits.shape[-2:], model.stride, num_heatmaps)
        losses = dense_losses(heatmap_logits, box_map, *targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
        if iteration % args.log_period == 0:
            seconds = (time.perf_counter() - window) / args.log_period
            window = time.perf_counter()
            logger.info(f"iter {iteration}: loss {loss.item():.4f} "
                        + " ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
                        + f" lr {lr:.2e} {seconds:.3f} s/it elapsed "
                        f"{(time.perf_counter() - start_train) / 60:.1f} min")
        if args.eval_period > 0 and iteration % args.eval_period == 0:
            stats = evaluate_and_save(iteration)
    logger.info(f"Training stopped after {iteration} iterations, "
                f"{(time.perf_counter() - start_train) / 60:.1f} min")
    if stats is None or args.eval_period <= 0 or iteration % args.eval_period != 0:
        stats = evaluate_and_save(iteration)
    logger.info(f"Final dense head AP {stats['AP']:.4f} AP50 {stats['AP50']:.4f}; "
                f"backbone written to {args.output}")
    return stats


def main(argv=None):
    args = parse_args(argv)
    log_file = os.path.splitext(args.output)[0] + "_log.txt"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    setup_logger(output=log_file, name="detr_d2", abbrev_name="pretrain")
    logger.info(f"Arguments: {vars(args)}")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
