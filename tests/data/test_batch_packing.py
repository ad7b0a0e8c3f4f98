"""pack_batch: a training batch crosses from the loader's workers as a few shared storages,
with every value unchanged (direct calls, a real 2-worker DataLoader, the Trainer's loader)."""
import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances
from torch.utils.data import DataLoader, Dataset

import detr_d2
from detr_d2.data import pack_batch, register_datasets_from_config
from detr_d2.engine import Trainer
from tests.helpers import TINY_CONFIG


def mapped_item(index):
    """A mapper-like output: uint8 image of an index-dependent size, ``index % 3`` boxes."""
    generator = torch.Generator().manual_seed(index)
    height, width = 40 + 8 * (index % 3), 56 - 4 * (index % 2)
    instances = Instances((height, width))
    count = index % 3
    instances.gt_boxes = Boxes(torch.rand(count, 4, generator=generator) * 30)
    instances.gt_classes = torch.randint(0, 5, (count,), generator=generator)
    return {"file_name": f"{index}.png", "image_id": index, "height": 32, "width": 32,
            "image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
            "instances": instances}


class MappedItems(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, index):
        return mapped_item(index)


def storage_pointer(tensor):
    return tensor.untyped_storage().data_ptr()


def assert_same_items(received, expected):
    assert len(received) == len(expected)
    for got, want in zip(received, expected):
        assert got.keys() == want.keys()
        for key in ("file_name", "image_id", "height", "width"):
            assert got[key] == want[key]
        assert got["image"].dtype == want["image"].dtype and torch.equal(got["image"], want["image"])
        assert got["instances"].image_size == want["instances"].image_size
        assert torch.equal(got["instances"].gt_boxes.tensor, want["instances"].gt_boxes.tensor)
        assert torch.equal(got["instances"].gt_classes, want["instances"].gt_classes)


def assert_packed(batch):
    """All images share one storage; so do all gt_boxes, and all gt_classes."""
    assert len({storage_pointer(item["image"]) for item in batch}) == 1
    assert len({storage_pointer(item["instances"].gt_boxes.tensor) for item in batch}) == 1
    assert len({storage_pointer(item["instances"].gt_classes) for item in batch}) == 1


def test_pack_batch_keeps_every_value_and_shares_storages():
    batch = [mapped_item(index) for index in range(6)]  # sizes differ; items 0 and 3 have no boxes
    original = copy.deepcopy(batch)
    packed = pack_batch(batch)
    assert_same_items(packed, original)
    assert_packed(packed)
    assert_same_items(batch, original)  # the input batch is left as it was


def test_pack_batch_leaves_fields_it_cannot_join():
    batch = [mapped_item(index) for index in (1, 2)]
    batch[0]["instances"].note = ["a"]  # item 1 has one box
    batch[1]["instances"].note = ["b", "c"]  # item 2 has two
    del batch[1]["image"]
    packed = pack_batch(batch)
    assert packed[0]["image"] is batch[0]["image"] and "image" not in packed[1]
    assert packed[0]["instances"].note == ["a"] and packed[1]["instances"].note == ["b", "c"]
    assert pack_batch([]) == []


def test_batches_from_worker_processes_arrive_packed_and_equal():
    loader = DataLoader(MappedItems(), batch_size=4, num_workers=2, collate_fn=pack_batch)
    for start, batch in zip(range(0, 12, 4), loader):
        assert_same_items(batch, [mapped_item(index) for index in range(start, start + 4)])
        assert_packed(batch)


@pytest.fixture
def tiny_training_config(datasets_root):
    cfg = get_cfg()
    detr_d2.add_detr_config(cfg)
    cfg.merge_from_file(str(TINY_CONFIG))
    coco = datasets_root / "coco"
    cfg.DATASETS.REGISTER_COCO = (("packing_train", str(coco / "annotations/instances_train2017.json"),
                                   str(coco / "train2017")),)
    cfg.DATASETS.TRAIN = ("packing_train",)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 1
    register_datasets_from_config(cfg)
    return cfg


@pytest.mark.parametrize("grouping", [False, True])
def test_trainer_loader_packs_batches_when_workers_collate_them(tiny_training_config, grouping):
    tiny_training_config.DATALOADER.ASPECT_RATIO_GROUPING = grouping
    batch = next(iter(Trainer.build_train_loader(tiny_training_config)))
    assert len(batch) == 2 and all(item["image"].dtype == torch.uint8 for item in batch)
    shared_images = len({storage_pointer(item["image"]) for item in batch}) == 1
    assert shared_images is not grouping  # with grouping the main process collates: nothing to gain
