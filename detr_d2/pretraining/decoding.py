"""Dense head outputs -> detections: the highest local maxima of the heatmaps as boxes."""
import torch
import torch.nn.functional as F


def decode_detections(heatmap_logits, box_map, image_sizes, stride, top_k):
    """Peaks of each image's heatmaps as boxes.

    Args:
        heatmap_logits: [B, K, h, w]; box_map: [B, 4, h, w] (width / image width, height /
            image height, centre offset x, y inside the cell in cells); image_sizes: (H, W)
            of each unpadded image; stride: pixels per feature cell.
    Returns per image (boxes [k, 4] xyxy absolute pixels of the unpadded image, clipped to
    it, scores [k], heatmap channels [k]): the ``top_k`` highest local maxima (3x3) over
    all channels.
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
