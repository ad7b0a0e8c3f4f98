"""The converter maps a published panoptic checkpoint's 251-output class head (COCO-panoptic
category ids 0..249 + no-object) onto detectron2's 133 contiguous COCO-panoptic classes +
no-object. The published files are large; the test builds one of that layout from the
DETRsegm fixture (its keys: detr.*, bbox_attention.*, mask_head.*) with a 251-row head whose
rows are told apart by their values."""
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from tests.helpers import config_for_fixture, convert_with_cli, fixture_dir

SEGM = "detr_upstream_segm_tiny"
HEAD_ROWS = 251


@pytest.fixture(scope="module")
def panoptic_checkpoint(tmp_path_factory):
    """(reference state dict with a 251-row head, converted state dict, converter stdout, path)."""
    folder = tmp_path_factory.mktemp("panoptic_conversion")
    reference = torch.load(fixture_dir(SEGM) / "checkpoint.pth", weights_only=True)["model"]
    hidden = reference["detr.class_embed.weight"].shape[1]
    rows = torch.arange(HEAD_ROWS, dtype=torch.float32)
    reference["detr.class_embed.weight"] = rows[:, None] + torch.linspace(0, 0.5, hidden)[None]
    reference["detr.class_embed.bias"] = -rows
    source, output = folder / "detr-panoptic.pth", folder / "converted.pth"
    torch.save({"model": reference}, source)
    result = convert_with_cli(source, output)
    assert result.returncode == 0, result.stderr
    return reference, torch.load(output, weights_only=True)["model"], result.stdout, output


def test_panoptic_head_becomes_133_classes_plus_no_object(panoptic_checkpoint):
    reference, converted, stdout, _ = panoptic_checkpoint
    assert "251 outputs -> 133" in stdout
    assert converted["class_embed.weight"].shape == (134, reference["detr.class_embed.weight"].shape[1])
    assert converted["class_embed.bias"].shape == (134,)
    # contiguous id -> COCO-panoptic category id, read off the stored rows (row i holds -i as bias)
    source_rows = (-converted["class_embed.bias"]).round().long().tolist()
    assert source_rows[0] == 1      # person
    assert source_rows[79] == 90    # toothbrush, the last thing
    assert source_rows[80] == 92    # banner, the first stuff class
    assert source_rows[132] == 200  # rug-merged, the last stuff class
    assert source_rows[133] == 250  # no-object: the reference head's last row
    for new, old in enumerate(source_rows):
        torch.testing.assert_close(converted["class_embed.weight"][new], reference["detr.class_embed.weight"][old])


def test_panoptic_head_follows_the_builtin_panoptic_metadata(panoptic_checkpoint):
    """Each contiguous id gets the row of the category the builtin coco_2017_val_panoptic
    metadata gives it (things and stuff maps), and names match detectron2's class list."""
    _, converted, _, _ = panoptic_checkpoint
    source_rows = (-converted["class_embed.bias"]).round().long().tolist()
    metadata = MetadataCatalog.get("coco_2017_val_panoptic")
    dataset_ids = {**metadata.thing_dataset_id_to_contiguous_id, **metadata.stuff_dataset_id_to_contiguous_id}
    assert len(dataset_ids) == 133
    for dataset_id, contiguous in dataset_ids.items():
        assert source_rows[contiguous] == dataset_id
    assert sorted(metadata.thing_dataset_id_to_contiguous_id.values()) == list(range(80))


def test_converted_panoptic_checkpoint_loads_into_a_133_class_panoptic_model(panoptic_checkpoint):
    _, converted, _, output = panoptic_checkpoint
    cfg = config_for_fixture(fixture_dir(SEGM))
    cfg.MODEL.DETR.NUM_CLASSES = 133
    cfg.MODEL.DETR.PANOPTIC_ON = True
    cfg.MODEL.DETR.PANOPTIC_THING_IDS = list(range(80))
    model = build_model(cfg)
    result = model.load_state_dict(converted, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    DetectionCheckpointer(model).load(str(output))
    torch.testing.assert_close(model.class_embed.bias, converted["class_embed.bias"])


def test_other_head_sizes_are_kept(converted_reference):
    """The fixture's own 7-output head (6 classes + no-object) is neither COCO layout: kept."""
    output, result = converted_reference(SEGM)
    assert result.returncode == 0 and "class head kept: 6 classes" in result.stdout
    reference = torch.load(fixture_dir(SEGM) / "checkpoint.pth", weights_only=True)["model"]
    converted = torch.load(output, weights_only=True)["model"]
    torch.testing.assert_close(converted["class_embed.weight"], reference["detr.class_embed.weight"])
