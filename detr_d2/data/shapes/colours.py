"""Choice of a shape colour that stands out from the pixels the shape covers (RGB, 0..255)."""
import numpy as np

MIN_CONTRAST = 100.0  # smallest RGB distance between a shape and any pixel it covers
COLOUR_ATTEMPTS = 64
COLOUR_BIN = 8  # RGB quantisation step used when measuring contrast


def _distinct_colour_bins(pixels):
    """Centres of the RGB bins (``COLOUR_BIN`` wide per channel) hit by ``pixels``, as
    (K, 3) floats: a small stand-in for the set of colours, off by at most ~7 in distance."""
    rgb = pixels.reshape(-1, 3).astype(np.int32) // COLOUR_BIN
    packed = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])
    bins = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1)
    return (bins + 0.5) * COLOUR_BIN


def contrasting_colour(rng, covered_pixels):
    """A random RGB colour (tuple of 3 ints) at least ``MIN_CONTRAST`` away from every pixel
    of ``covered_pixels`` (uint8 [..., 3]): the first of ``COLOUR_ATTEMPTS`` candidates that
    is, else the farthest candidate."""
    candidates = rng.integers(0, 256, size=(COLOUR_ATTEMPTS, 3))
    covered = _distinct_colour_bins(covered_pixels)
    squared = ((candidates[:, None, :] - covered[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    passing = np.flatnonzero(squared >= MIN_CONTRAST ** 2)
    best = passing[0] if passing.size else int(np.argmax(squared))
    return tuple(int(c) for c in candidates[best])
