"""Fixtures shared by the test packages; the helpers they use live in tests/helpers.py."""
import pytest

from tests.helpers import write_coco_split


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """A $DETECTRON2_DATASETS holding coco/train2017 (2 images) and coco/val2017 (2 images)."""
    root = tmp_path_factory.mktemp("detectron2_datasets")
    write_coco_split(root / "coco", "train2017", num_images=2, seed=0)
    write_coco_split(root / "coco", "val2017", num_images=2, seed=1)
    return root
