"""Random smooth image backgrounds: uint8 RGB arrays [S, S, 3] for an S-pixel square image."""
import cv2
import numpy as np


def _gradient_background(rng, image_size):
    """Linear blend of two random colours along a random direction, as float32 RGB."""
    start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    coords = np.arange(image_size, dtype=np.float32)
    t = coords[None, :] * np.float32(np.cos(angle)) + coords[:, None] * np.float32(np.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return start + t[..., None] * (end - start)


def _smooth_noise_background(rng, image_size):
    """Bicubically upsampled coarse grid of colours near a random base colour, as float32 RGB."""
    cells = int(rng.integers(2, 6))
    base = rng.uniform(40, 215, size=3)
    grid = (base + rng.uniform(-50, 50, size=(cells, cells, 3))).astype(np.float32)
    return cv2.resize(grid, (image_size, image_size), interpolation=cv2.INTER_CUBIC)


def random_background(rng, image_size):
    """A smooth random background with mild pixel noise, as uint8 RGB."""
    make = _gradient_background if rng.random() < 0.5 else _smooth_noise_background
    background = make(rng, image_size)
    noise_level = np.float32(rng.uniform(0, 6))
    background += noise_level * rng.standard_normal(background.shape, dtype=np.float32)
    return np.clip(np.rint(background), 0, 255).astype(np.uint8)
