"""Augmentations detectron2 lacks for DETR's data pipeline."""
from detectron2.data import transforms as T


class RandomApplyList(T.Augmentation):
    """Apply a list of augmentations in sequence with probability ``prob``, else nothing.

    detectron2's ``RandomApply`` wraps a single augmentation; DETR's random crop is two
    (resize the shortest edge, then crop) that must be applied together or not at all.
    The coin is drawn with ``Augmentation._rand_range`` (numpy's global RNG), like every
    detectron2 augmentation, so seeding numpy makes the choice reproducible.

    Like ``AugmentationList``, it has no ``get_transform``: it is applied by calling it
    on an ``AugInput``, which it transforms in place.
    """

    def __init__(self, augs, prob=0.5):
        """
        Args:
            augs (list[Augmentation or Transform]): applied in order when chosen.
            prob (float): probability in [0, 1] of applying ``augs``.
        """
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.augs = T.AugmentationList(augs)
        self.prob = prob

    def __call__(self, aug_input):
        """Augment ``aug_input`` in place; return the transform applied (NoOp if skipped)."""
        if self._rand_range() < self.prob:
            return self.augs(aug_input)
        return T.NoOpTransform()

    def __repr__(self):
        return f"RandomApplyList(prob={self.prob}, augs={self.augs})"

    __str__ = __repr__
