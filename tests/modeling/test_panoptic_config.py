"""MODEL.DETR.PANOPTIC_ON: the switch, its checks, the thing classes taken from a panoptic
dataset's metadata by build_config, and the model's panoptic_seg output in detectron2's
format (real configs, real detectron2 metadata; no dataset files are read)."""
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_panoptic
from detectron2.modeling import build_model

from detr_d2.engine import build_config
from detr_d2.errors import SetupError
from tests.helpers import REPO, TINY_CONFIG, batch_with_masks, tiny_cfg

MASKS = ["MODEL.MASK_ON", "True", "MODEL.DETR.HIDDEN_DIM", "128", "MODEL.DETR.NHEADS", "8",
         "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"]
PANOPTIC = [*MASKS, "MODEL.DETR.PANOPTIC_ON", "True"]
# A user's panoptic set registered with detectron2's own register_coco_panoptic: dataset ids
# 7 (stuff), 10 (thing), 20 (stuff), 30 (thing) -> contiguous 0..3 by dataset id.
USER_SET = "panoptic_config_test_set"
USER_THINGS = {10: 1, 30: 3}
USER_STUFF = {7: 0, 20: 2}


@pytest.fixture(scope="module")
def user_panoptic_set():
    if USER_SET not in DatasetCatalog.list():
        names = ["sky", "car", "road", "dog"]
        colours = [[70, 130, 180], [0, 0, 142], [128, 64, 128], [220, 20, 60]]
        metadata = {"thing_classes": names, "stuff_classes": names, "thing_colors": colours,
                    "stuff_colors": colours, "thing_dataset_id_to_contiguous_id": USER_THINGS,
                    "stuff_dataset_id_to_contiguous_id": USER_STUFF}
        register_coco_panoptic(USER_SET, metadata, "unused/images", "unused/panoptic", "unused/panoptic.json")
    return USER_SET


def built(*opts, config=TINY_CONFIG, **kwargs):
    return build_config(str(config), ["MODEL.DEVICE", "cpu", *[str(o) for o in opts]], **kwargs)


def test_panoptic_is_off_by_default_with_the_references_threshold():
    cfg = built()
    assert cfg.MODEL.DETR.PANOPTIC_ON is False and cfg.MODEL.DETR.PANOPTIC_THRESHOLD == 0.85
    assert cfg.MODEL.DETR.PANOPTIC_THING_IDS is None


def test_panoptic_without_masks_is_refused_with_the_fix():
    with pytest.raises(SetupError, match=r"MODEL.DETR.PANOPTIC_ON is True but must be False without MODEL.MASK_ON"
                                         r".*add MODEL.MASK_ON True"):
        built("MODEL.DETR.PANOPTIC_ON", "True")
    cfg = tiny_cfg("MODEL.DETR.PANOPTIC_ON", "True", "MODEL.DETR.PANOPTIC_THING_IDS", "[0]")
    with pytest.raises(ValueError, match="PANOPTIC_ON needs MODEL.MASK_ON"):
        build_model(cfg)  # not through build_config: the model refuses too


@pytest.mark.parametrize("opts, message", [
    (["MODEL.DETR.PANOPTIC_THRESHOLD", "1.5"], r"MODEL.DETR.PANOPTIC_THRESHOLD is 1.5 but must be in \[0, 1\)"),
    (["MODEL.DETR.PANOPTIC_THING_IDS", "[0, 0]"], r"PANOPTIC_THING_IDS is \[0, 0\] but must be unset"),
    (["MODEL.DETR.PANOPTIC_THING_IDS", "[0, 80]"], r"\[80\] are not contiguous class ids 0..79"),
])
def test_bad_panoptic_values_are_named(opts, message):
    with pytest.raises(SetupError, match=message):
        built(*PANOPTIC, *opts)


def test_thing_classes_come_from_the_builtin_coco_panoptic_metadata():
    cfg = built(config=REPO / "configs" / "detr_r50_panoptic.yaml")
    assert cfg.MODEL.DETR.NUM_CLASSES == 133
    assert list(cfg.MODEL.DETR.PANOPTIC_THING_IDS) == list(range(80))  # things first in COCO_CATEGORIES


def test_thing_classes_come_from_a_users_panoptic_metadata(user_panoptic_set):
    cfg = built(*PANOPTIC, "DATASETS.TRAIN", f"('{user_panoptic_set}',)", "DATASETS.TEST", "()")
    assert cfg.MODEL.DETR.NUM_CLASSES == 4
    assert list(cfg.MODEL.DETR.PANOPTIC_THING_IDS) == [1, 3]


def test_explicit_thing_classes_must_agree_with_panoptic_data(user_panoptic_set):
    opts = [*PANOPTIC, "DATASETS.TRAIN", f"('{user_panoptic_set}',)", "DATASETS.TEST", "()"]
    with pytest.raises(SetupError, match=r"PANOPTIC_THING_IDS is \[0, 1\] but .* has the thing classes \[1, 3\]"):
        built(*opts, "MODEL.DETR.PANOPTIC_THING_IDS", "[0, 1]")
    assert list(built(*opts, "MODEL.DETR.PANOPTIC_THING_IDS", "[3, 1]").MODEL.DETR.PANOPTIC_THING_IDS) == [3, 1]


def test_a_detection_training_set_has_no_thing_stuff_split():
    with pytest.raises(SetupError, match=r"dataset 'coco_2017_train' has no panoptic metadata.*PANOPTIC_THING_IDS"):
        built(*PANOPTIC)
    assert list(built(*PANOPTIC, "MODEL.DETR.PANOPTIC_THING_IDS", "[0, 2]").MODEL.DETR.PANOPTIC_THING_IDS) == [0, 2]


def test_the_separated_panoptic_form_is_refused():
    """PanopticFPN's *_separated metadata numbers stuff apart from things: not one class head."""
    with pytest.raises(SetupError, match="not the \\*_separated form"):
        built(*PANOPTIC, "DATASETS.TRAIN", "('coco_2017_val_panoptic_separated',)", "MODEL.DETR.NUM_CLASSES", "133",
              all_datasets_registered=False)


def test_model_output_is_detectron2s_panoptic_format(user_panoptic_set):
    """Every query kept (threshold 0): seg int32 at the requested size, ids 1..N listed in
    segments_info with contiguous category_id, isthing from the metadata, score, area."""
    cfg = built(*PANOPTIC, "DATASETS.TRAIN", f"('{user_panoptic_set}',)", "DATASETS.TEST", "()",
                "MODEL.DETR.PANOPTIC_THRESHOLD", "0.0")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        result = model([{"image": image, "height": 48, "width": 70}])[0]
    seg, segments_info = result["panoptic_seg"]
    assert seg.dtype == torch.int32 and seg.shape == (48, 70)
    assert result["instances"].pred_masks.shape == (10, 48, 70)
    assert segments_info, "random weights: some query's best class is not no-object"
    assert [s["id"] for s in segments_info] == list(range(1, len(segments_info) + 1))
    assert set(torch.unique(seg).tolist()) == {s["id"] for s in segments_info}
    for segment in segments_info:
        assert 0 <= segment["category_id"] < 4
        assert segment["isthing"] == (segment["category_id"] in USER_THINGS.values())
        assert 0.0 < segment["score"] <= 1.0
        assert segment["area"] == int((seg == segment["id"]).sum()) > 4


def test_evaluation_with_losses_also_gives_panoptic_seg(user_panoptic_set):
    """inference_with_losses (periodic evaluation with TEST.EVAL_LOSSES) returns the same
    results as forward, panoptic_seg included."""
    cfg = built(*PANOPTIC, "DATASETS.TRAIN", f"('{user_panoptic_set}',)", "DATASETS.TEST", "()",
                "MODEL.DETR.PANOPTIC_THRESHOLD", "0.0")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = batch_with_masks()
    with torch.no_grad():
        results, losses = model.inference_with_losses(batch)
        plain = model([{"image": item["image"]} for item in batch])
    for result, expected, item in zip(results, plain, batch):
        assert result["panoptic_seg"][0].shape == item["image"].shape[1:]
        assert torch.equal(result["panoptic_seg"][0], expected["panoptic_seg"][0])
        assert result["panoptic_seg"][1] == expected["panoptic_seg"][1]
    assert len(losses) == 2 and "loss_mask" in losses[0]


def test_without_panoptic_on_there_is_no_panoptic_seg():
    model = build_model(tiny_cfg(*MASKS)).eval()
    with torch.no_grad():
        result = model([{"image": torch.zeros((3, 64, 64), dtype=torch.uint8)}])[0]
    assert "panoptic_seg" not in result and model.panoptic is None


def test_panoptic_seg_under_bfloat16_autocast(user_panoptic_set):
    """Inference under autocast (TEST.AMP.ENABLED): the post-processing runs in float32 on
    the 16-bit mask logits and gives the same format."""
    cfg = built(*PANOPTIC, "DATASETS.TRAIN", f"('{user_panoptic_set}',)", "DATASETS.TEST", "()",
                "MODEL.DETR.PANOPTIC_THRESHOLD", "0.0")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        seg, segments_info = model([{"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)}])[0]["panoptic_seg"]
    assert seg.dtype == torch.int32 and seg.shape == (64, 96) and segments_info
    assert set(torch.unique(seg).tolist()) == {s["id"] for s in segments_info}
    assert all(isinstance(s["score"], float) for s in segments_info)
