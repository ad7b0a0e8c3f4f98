"""CenterNet-style targets of the dense head and its losses.

On a feature map of stride s, each object (xyxy absolute-pixel box) gives

* a Gaussian on its class's heatmap channel, centred at the box centre (in cell units,
  cell centres at 0.5, 1.5, ...), sigma = max(0.5, 0.15 * box side / s) per axis, and
  exactly 1 at the cell holding the centre; overlapping Gaussians keep the maximum;
* four box values at that centre cell: width / image width, height / image height and
  the centre's offset (x, y) inside its cell (in cells, 0..1).

Losses: CenterNet's penalty-reduced focal loss (alpha 2, beta 4) on the heatmaps,
normalised by the number of objects, and 5 x the L1 distance of the box values at the
centre cells, averaged over objects and values.
"""
import numpy as np
import torch
import torch.nn.functional as F

NUM_BOX_VALUES = 4  # width / image width, height / image height, offset x, offset y (cells)
FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0
BOX_WEIGHT = 5.0


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
    """Stacked ``dense_targets`` as tensors: heatmaps [B, K, h, w], indices (batch, row,
    col) [3, N] int64, values [N, 4], over the N objects of the batch."""
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


def centernet_focal_loss(logits, target):
    """CenterNet's penalty-reduced focal loss of heatmap logits against target heatmaps
    (both [B, K, h, w]), summed and divided by the number of peaks (target == 1)."""
    prob = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    pos_loss = -torch.log(prob) * (1 - prob) ** FOCAL_ALPHA * positive
    neg_loss = -torch.log(1 - prob) * prob ** FOCAL_ALPHA * (1 - target) ** FOCAL_BETA * (1 - positive)
    return (pos_loss.sum() + neg_loss.sum()) / positive.sum().clamp(min=1)


def dense_losses(heatmap_logits, box_map, heatmaps, indices, values):
    """Losses of the head outputs (heatmap logits [B, K, h, w], box values [B, 4, h, w])
    against ``batch_targets``: {"loss_heatmap": focal loss, "loss_box": 5 x mean L1 of the
    box values at the centre cells}."""
    b, row, col = indices
    predicted = box_map.permute(0, 2, 3, 1)[b, row, col]  # [N, 4]
    loss_box = F.l1_loss(predicted, values) if len(values) else box_map.sum() * 0
    return {"loss_heatmap": centernet_focal_loss(heatmap_logits, heatmaps),
            "loss_box": BOX_WEIGHT * loss_box}
