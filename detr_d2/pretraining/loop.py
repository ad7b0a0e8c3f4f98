"""The pretraining run: data, model, optimizer, the training loop, evaluation and saving."""
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from detectron2.modeling import build_backbone
from pycocotools.coco import COCO

from detr_d2.pretraining.backbone_checkpoint import backbone_checkpoint, check_detr_names, save_backbone
from detr_d2.pretraining.batches import ShuffledBatches, normalized_batch
from detr_d2.pretraining.centernet_targets import batch_targets, dense_losses
from detr_d2.pretraining.coco_images import CocoImages
from detr_d2.pretraining.config import pixel_mean_std, pretraining_configs
from detr_d2.pretraining.dense_head import DenseDetector
from detr_d2.pretraining.evaluation import class_agnostic_coco, evaluate
from detr_d2.pretraining.schedule import learning_rate, run_progress

logger = logging.getLogger("detr_d2.pretrain_backbone")  # the name its log lines have always shown


@dataclass(frozen=True)
class PretrainingOptions:
    """Everything a run depends on; the flags of tools/pretrain_backbone.py, same names.

    ``opts``: config overrides (KEY VALUE list); ``max_minutes`` 0: no time limit;
    ``eval_period`` 0: evaluate only at the end; ``no_flip``: no random horizontal flips.
    """

    config_file: str
    opts: list
    train_json: str
    train_images: str
    val_json: str
    val_images: str
    output: str
    class_agnostic: bool
    max_iter: int
    max_minutes: float
    batch_size: int
    lr: float
    weight_decay: float
    warmup_iters: int
    no_flip: bool
    eval_period: int
    top_k: int
    log_period: int
    num_threads: int
    seed: int


@dataclass(frozen=True)
class PretrainingData:
    """The train and val images, the number of heatmap channels and the val ground truth
    that evaluation scores against (all category 1 when class-agnostic)."""

    train: CocoImages
    val: CocoImages
    num_heatmaps: int
    val_coco: COCO


def load_pretraining_data(options, image_format):
    """The ``PretrainingData`` of ``options``; raises ValueError if per-class train and val
    json have different categories."""
    start = time.perf_counter()
    train = CocoImages(options.train_json, options.train_images, image_format)
    val = CocoImages(options.val_json, options.val_images, image_format)
    num_heatmaps = 1 if options.class_agnostic else len(train.category_ids)
    if not options.class_agnostic and train.category_ids != val.category_ids:
        raise ValueError("train and val json have different categories; use --class-agnostic")
    val_coco = class_agnostic_coco(val.coco) if options.class_agnostic else val.coco
    logger.info(f"Loaded {len(train)} train / {len(val)} val images in "
                f"{time.perf_counter() - start:.1f} s; classes {train.class_names}, "
                f"{num_heatmaps} heatmap channel(s)")
    return PretrainingData(train, val, num_heatmaps, val_coco)


class PretrainingRun:
    """The training loop of a ``DenseDetector``: AdamW, warm-up + cosine learning rate,
    periodic logging, evaluation and saving of the backbone checkpoint."""

    def __init__(self, options, model, data, pixel_stats, rng):
        self.options, self.model, self.data = options, model, data
        self.pixel_mean, self.pixel_std = pixel_stats
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        self.batches = ShuffledBatches(data.train, options.batch_size, rng, not options.no_flip,
                                       options.class_agnostic)
        self.start = None  # perf_counter() at the start of training

    def _minutes(self):
        """Minutes since training started."""
        return (time.perf_counter() - self.start) / 60

    def _set_learning_rate(self, lr):
        """Give every parameter group learning rate ``lr``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _step(self, iteration):
        """One optimizer step on the next batch; returns (total loss, {name: loss})."""
        images, boxes, labels = self.batches.next_batch()
        batch = normalized_batch(images, self.pixel_mean, self.pixel_std, self.model.stride)
        heatmap_logits, box_map = self.model(batch)
        targets = batch_targets(boxes, labels, [im.shape[:2] for im in images],
                                heatmap_logits.shape[-2:], self.model.stride, self.data.num_heatmaps)
        losses = dense_losses(heatmap_logits, box_map, *targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, losses

    def _save(self, iteration, stats):
        """Write the backbone checkpoint with the facts of the run so far."""
        options = self.options
        facts = {"iterations": iteration, "minutes": self._minutes(),
                 "class_agnostic": bool(options.class_agnostic), "config_file": options.config_file,
                 "train_json": options.train_json, "dense_head_AP": stats["AP"],
                 "dense_head_AP50": stats["AP50"]}
        save_backbone(options.output, self.model.backbone, facts)
        logger.info(f"Saved the backbone to {options.output}")

    def _evaluate_and_save(self, iteration):
        """Evaluate on the val data, log, save the checkpoint; returns the AP stats."""
        eval_start = time.perf_counter()
        stats, summary = evaluate(self.model, self.data.val, self.pixel_mean, self.pixel_std,
                                  self.options.class_agnostic, self.options.top_k, gt_coco=self.data.val_coco)
        kind = "class-agnostic" if self.options.class_agnostic else "per class"
        logger.info(f"iter {iteration}: dense head AP {stats['AP']:.4f} AP50 {stats['AP50']:.4f} "
                    f"AP75 {stats['AP75']:.4f} ({kind}, eval {time.perf_counter() - eval_start:.1f} s)\n{summary}")
        self._save(iteration, stats)
        return stats

    def train(self):
        """Train until ``max_iter`` iterations or ``max_minutes``; returns the last AP stats."""
        options = self.options
        max_seconds = options.max_minutes * 60 if options.max_minutes > 0 else float("inf")
        iteration, stats = 0, None
        self.start = window = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - self.start
            if iteration >= options.max_iter or elapsed >= max_seconds:
                break
            progress = run_progress(iteration, options.max_iter, elapsed, max_seconds)
            lr = learning_rate(options.lr, iteration, options.warmup_iters, progress)
            self._set_learning_rate(lr)
            loss, losses = self._step(iteration)
            iteration += 1
            if iteration % options.log_period == 0:
                seconds = (time.perf_counter() - window) / options.log_period
                window = time.perf_counter()
                logger.info(f"iter {iteration}: loss {loss.item():.4f} "
                            + " ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
                            + f" lr {lr:.2e} {seconds:.3f} s/it elapsed {self._minutes():.1f} min")
            if options.eval_period > 0 and iteration % options.eval_period == 0:
                stats = self._evaluate_and_save(iteration)
        logger.info(f"Training stopped after {iteration} iterations, {self._minutes():.1f} min")
        if stats is None or options.eval_period <= 0 or iteration % options.eval_period != 0:
            stats = self._evaluate_and_save(iteration)
        logger.info(f"Final dense head AP {stats['AP']:.4f} AP50 {stats['AP50']:.4f}; "
                    f"backbone written to {options.output}")
        return stats


def pretrain_backbone(options):
    """Pretrain the backbone of ``options.config_file`` with a dense head and write it to
    ``options.output``; returns the final AP stats of the dense head."""
    torch.set_num_threads(options.num_threads)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    cfg, cfg_train = pretraining_configs(options.config_file, options.opts)
    backbone = build_backbone(cfg_train)
    check_detr_names(cfg, backbone_checkpoint(backbone))
    data = load_pretraining_data(options, cfg.INPUT.FORMAT)
    model = DenseDetector(backbone, cfg.MODEL.DETR.IN_FEATURE, data.num_heatmaps)
    model.train()
    logger.info(f"Backbone {cfg.MODEL.BACKBONE.NAME}: "
                f"{sum(p.numel() for p in backbone.parameters())} parameters, "
                f"output {backbone.output_shape()}")
    return PretrainingRun(options, model, data, pixel_mean_std(cfg), rng).train()
