"""Image batches for the dense head: normalised, padded tensors and shuffled training batches."""
import numpy as np
import torch


def flip_horizontally(image, boxes):
    """Mirror an image [H, W, 3] and its xyxy absolute-pixel boxes [n, 4]."""
    width = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return image[:, ::-1], flipped


def normalized_batch(images, pixel_mean, pixel_std, size_divisibility):
    """uint8 [H, W, 3] images -> float [B, 3, H', W'] normalised with ``pixel_mean`` and
    ``pixel_std`` ([3, 1, 1]), zero-padded bottom/right to a common size (a multiple of
    ``size_divisibility``)."""
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


class ShuffledBatches:
    """Training batches drawn from a ``CocoImages`` without replacement: a random order of
    the images is walked ``batch_size`` at a time and redrawn when fewer images than a
    batch remain. Each image is flipped horizontally with probability 0.5 unless ``flip``
    is False. With ``class_agnostic`` every label is 0 (one heatmap)."""

    def __init__(self, data, batch_size, rng, flip, class_agnostic):
        self.data, self.batch_size, self.rng = data, batch_size, rng
        self.flip, self.class_agnostic = flip, class_agnostic
        self.order, self.cursor = rng.permutation(len(data)), 0

    def _next_indices(self):
        """Indices of the next batch's images."""
        if self.cursor + self.batch_size > len(self.order):
            self.order, self.cursor = self.rng.permutation(len(self.data)), 0
        picked = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return picked

    def next_batch(self):
        """(images uint8 [H, W, 3], boxes float32 [n, 4] xyxy pixels, labels int64 [n]) lists."""
        picked = self._next_indices()
        images, boxes = [], []
        for i in picked:
            image, image_boxes = self.data.images[i], self.data.boxes[i]
            if self.flip and self.rng.random() < 0.5:
                image, image_boxes = flip_horizontally(image, image_boxes)
            images.append(image)
            boxes.append(image_boxes)
        labels = [np.zeros_like(self.data.labels[i]) if self.class_agnostic else self.data.labels[i]
                  for i in picked]
        return images, boxes, labels
