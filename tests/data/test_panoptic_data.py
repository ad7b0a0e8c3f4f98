"""COCO-panoptic data: registration (YAML, command line), the generated panoptic shapes,
the mapper's targets (crop, flip, resize, void pixels, a crowd segment) and the defects
reported before training."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from PIL import Image

import detr_d2
from detr_d2.data import DatasetError, DetrDatasetMapper, register_datasets_from_config, resolve_num_classes
from detr_d2.data.panoptic_validation import PanopticDataError, read_panoptic_png
from detr_d2.data.shapes import PRESETS, generate_panoptic_dataset
from detr_d2.engine.datasets import load_dataset_dicts
from tests.helpers import REPO, assert_one_line_error, run_concurrently, train_net

CLASSES = PRESETS["panoptic"]


@pytest.fixture(scope="module")
def panoptic(tmp_path_factory):
    """A small generated panoptic shapes set: its folder (train 12 images, val 3)."""
    root = tmp_path_factory.mktemp("panoptic_shapes")
    generate_panoptic_dataset(root, CLASSES, {"train": 12, "val": 3}, seed=3)
    return root


def entry(name, root, split="train"):
    return (name, str(root / "annotations" / f"panoptic_{split}.json"), str(root / "panoptic" / split),
            str(root / "images" / split))


def detr_config(*opts):
    cfg = detr_d2.add_detr_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "Base-DETR.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def registered(name, root, split="train"):
    cfg = detr_config("DATASETS.REGISTER_COCO_PANOPTIC", repr((entry(name, root, split),)),
                      "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()")
    register_datasets_from_config(cfg)
    return cfg


def ids_of(record):
    return read_panoptic_png(record["pan_seg_file_name"])


# ---------------------------------------------------------------- the generated set
def test_generated_set_is_coco_panoptic_with_things_stuff_void_and_crowds(panoptic):
    data = json.loads((panoptic / "annotations" / "panoptic_train.json").read_text())
    categories = {c["id"]: c for c in data["categories"]}
    assert sorted(categories) == [1, 3, 5, 7, 9, 11, 100, 102, 104]  # not contiguous
    assert [c["name"] for c in data["categories"] if not c["isthing"]] == ["sky", "ground", "water"]
    crowds = void_pixels = 0
    for annotation in data["annotations"]:
        ids = read_panoptic_png(panoptic / "panoptic" / "train" / annotation["file_name"])
        listed = {s["id"]: s for s in annotation["segments_info"]}
        assert set(np.unique(ids)) - {0} == set(listed)  # every listed id present, nothing else but void
        for segment_id, segment in listed.items():
            ys, xs = np.nonzero(ids == segment_id)
            assert segment["area"] == len(xs)
            assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert sum(not categories[s["category_id"]]["isthing"] for s in listed.values()) >= 1
        crowds += sum(s["iscrowd"] for s in listed.values())
        void_pixels += int((ids == 0).sum())
    assert crowds >= 1 and void_pixels > 0
    assert max(s["id"] for a in data["annotations"] for s in a["segments_info"]) > 65536  # uses the B channel


def test_generation_is_deterministic_and_cached(panoptic, tmp_path):
    again = tmp_path / "again"
    generate_panoptic_dataset(again, CLASSES, {"train": 12, "val": 3}, seed=3)
    for path in ("annotations/panoptic_train.json", "panoptic/train/000004.png", "images/val/000002.png"):
        assert (again / path).read_bytes() == (panoptic / path).read_bytes()
    stamp = (again / "images/train/000000.png").stat().st_mtime_ns
    generate_panoptic_dataset(again, CLASSES, {"train": 12, "val": 3}, seed=3)
    assert (again / "images/train/000000.png").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- registration
def test_registration_from_yaml_with_relative_paths(panoptic, tmp_path, monkeypatch):
    monkeypatch.chdir(panoptic)
    yaml_file = tmp_path / "panoptic.yaml"
    yaml_file.write_text(f'_BASE_: "{REPO / "configs" / "Base-DETR.yaml"}"\nDATASETS:\n'
                         '  REGISTER_COCO_PANOPTIC: (("yaml_pan", "annotations/panoptic_train.json", '
                         '"panoptic/train", "images/train"),)\n  TRAIN: ("yaml_pan",)\n  TEST: ()\n')
    cfg = detr_d2.add_detr_config(get_cfg())
    cfg.merge_from_file(str(yaml_file))
    register_datasets_from_config(cfg)
    assert cfg.DATASETS.REGISTER_COCO_PANOPTIC == (entry("yaml_pan", panoptic),)
    assert resolve_num_classes(cfg) == 9  # 6 things + 3 stuff
    metadata = MetadataCatalog.get("yaml_pan")
    assert metadata.evaluator_type == "coco_panoptic_seg"
    assert metadata.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1, 5: 2, 7: 3, 9: 4, 11: 5}
    assert metadata.stuff_dataset_id_to_contiguous_id == {100: 6, 102: 7, 104: 8}
    assert metadata.thing_classes == metadata.stuff_classes == [*CLASSES, "sky", "ground", "water"]
    assert (metadata.panoptic_root, metadata.image_root) == (str(panoptic / "panoptic" / "train"),
                                                             str(panoptic / "images" / "train"))
    records = load_dataset_dicts("yaml_pan")
    assert len(records) == 12 and records[0]["file_name"].endswith(".png")  # not forced to .jpg
    stuff = [s for r in records for s in r["segments_info"] if not s["isthing"]]
    assert stuff and all(6 <= s["category_id"] <= 8 for s in stuff)


def test_registering_twice_same_files_is_fine_other_files_is_an_error(panoptic):
    registered("twice_pan", panoptic)
    registered("twice_pan", panoptic)
    with pytest.raises(DatasetError, match="twice_pan.*already registered"):
        registered("twice_pan", panoptic, "val")
    with pytest.raises(DatasetError, match="REGISTER_COCO_PANOPTIC entry .* four strings"):
        register_datasets_from_config(detr_config("DATASETS.REGISTER_COCO_PANOPTIC", "(('a', 'b', 'c'),)"))


# ---------------------------------------------------------------- the mapper
def mapped(record, *augmentations, with_masks=True):
    mapper = DetrDatasetMapper(True, augmentations=list(augmentations), image_format="RGB",
                               mask_format="bitmask" if with_masks else None)
    return mapper(record)


def expected_masks(record, ids):
    """bool [N, H, W] of the record's segments in ``ids`` (a transformed id map)."""
    return np.stack([ids == s["id"] for s in record["segments_info"]])


def check_targets(instances, record, ids):
    """Every segment present in ``ids`` is a target: its class, its mask, its tight box."""
    masks = expected_masks(record, ids)
    present = masks.reshape(len(masks), -1).any(axis=1)
    assert instances.gt_masks.tensor.numpy().tolist() == masks[present].tolist()
    classes = [s["category_id"] for s, p in zip(record["segments_info"], present) if p]
    assert instances.gt_classes.tolist() == classes
    for box, mask in zip(instances.gt_boxes.tensor.tolist(), masks[present]):
        ys, xs = np.nonzero(mask)
        assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return present


def crowd_record(panoptic):
    registered("mapper_pan", panoptic)
    records = DatasetCatalog.get("mapper_pan")
    return next(r for r in records if any(s["iscrowd"] for s in r["segments_info"]))


def test_mapper_flip_keeps_crowd_segments_and_void_pixels_in_no_target(panoptic):
    record = crowd_record(panoptic)
    ids = ids_of(record)
    flipped = mapped(record, T.HFlipTransform(ids.shape[1]))
    instances = flipped["instances"]
    assert torch.equal(flipped["image"], torch.from_numpy(
        np.asarray(Image.open(record["file_name"]).convert("RGB"))[:, ::-1].transpose(2, 0, 1).copy()))
    present = check_targets(instances, record, ids[:, ::-1])
    assert present.all()  # a flip loses no segment, the crowd one included
    crowd = [i for i, s in enumerate(record["segments_info"]) if s["iscrowd"]]
    assert instances.gt_classes[crowd].tolist() == [record["segments_info"][i]["category_id"] for i in crowd]
    void = ids[:, ::-1] == 0
    assert void.any() and not instances.gt_masks.tensor[:, torch.from_numpy(void.copy())].any()


def test_mapper_crop_drops_segments_outside_and_boxes_fit_the_cropped_masks(panoptic):
    record = crowd_record(panoptic)
    ids = ids_of(record)
    for x0, y0, w, h in ((0, 0, 40, 30), (70, 60, 58, 50), (30, 90, 90, 38)):
        instances = mapped(record, T.CropTransform(x0, y0, w, h))["instances"]
        assert instances.image_size == (h, w)
        present = check_targets(instances, record, ids[y0:y0 + h, x0:x0 + w])
        assert len(instances) == present.sum()
    assert not check_targets(mapped(record, T.CropTransform(0, 0, 40, 30))["instances"], record,
                             ids[:30, :40]).all()  # some crop loses segments


def test_mapper_resize_is_nearest_on_ids_and_boxes_only_without_masks(panoptic):
    record = crowd_record(panoptic)
    ids = ids_of(record)
    resize = T.ResizeTransform(128, 128, 75, 93, Image.BILINEAR)  # image bilinear, ids nearest
    instances = mapped(record, resize)["instances"]
    png = np.asarray(Image.open(record["pan_seg_file_name"]).resize((93, 75), Image.NEAREST), dtype=np.int64)
    resized_ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]  # PIL's nearest pixels
    assert set(np.unique(resized_ids)) <= set(np.unique(ids))
    check_targets(instances, record, resized_ids)
    assert (instances.gt_masks.tensor.sum(0) <= 1).all()
    boxes_only = mapped(record, resize, with_masks=False)["instances"]
    assert not boxes_only.has("gt_masks")
    assert torch.equal(boxes_only.gt_boxes.tensor, instances.gt_boxes.tensor)


def test_test_mapper_has_no_instances_unless_asked(panoptic):
    record = crowd_record(panoptic)
    mapper = DetrDatasetMapper(False, augmentations=[], image_format="RGB")
    assert "instances" not in mapper(record)
    with_gt = DetrDatasetMapper(False, augmentations=[], image_format="RGB", with_instances=True)
    assert len(with_gt(record)["instances"]) == len(record["segments_info"])


# ---------------------------------------------------------------- defects, before training
def broken_copy(panoptic, tmp_path, name):
    """A copy of the train split to break; returns (root, json data, json path)."""
    root = tmp_path / name
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(panoptic / "images" / "train", root / "images" / "train")
    shutil.copytree(panoptic / "panoptic" / "train", root / "panoptic" / "train")
    json_path = root / "annotations" / "panoptic_train.json"
    shutil.copy(panoptic / "annotations" / "panoptic_train.json", json_path)
    return root, json.loads(json_path.read_text()), json_path


def break_missing_png(root, data):
    (root / "panoptic" / "train" / "000003.png").unlink()
    return "000003.png"


def break_absent_segment(root, data):
    data["annotations"][2]["segments_info"][0]["id"] = 777
    return "000002.png.*777"


def break_png_size(root, data):
    path = root / "panoptic" / "train" / "000005.png"
    Image.open(path).crop((0, 0, 100, 128)).save(path)
    return "000005.png is 100x128.*image_id 6 is 128x128"


def break_unknown_category(root, data):
    segment = data["annotations"][4]["segments_info"][1]
    segment["category_id"] = 55
    return f"000004.png.*segment id.*{segment['id']}.*category_id not in 'categories'"


@pytest.mark.parametrize("defect", [break_missing_png, break_absent_segment, break_png_size,
                                    break_unknown_category])
def test_defects_are_reported_before_training_naming_file_and_id(panoptic, tmp_path, defect):
    root, data, json_path = broken_copy(panoptic, tmp_path, defect.__name__)
    pattern = defect(root, data)
    json_path.write_text(json.dumps(data))
    name = f"broken_{defect.__name__}"
    register_datasets_from_config(detr_config("DATASETS.REGISTER_COCO_PANOPTIC",
                                              repr(((name, str(json_path), str(root / "panoptic" / "train"),
                                                     str(root / "images" / "train")),))))
    with pytest.raises(PanopticDataError, match=pattern) as error:
        load_dataset_dicts(name)
    assert "\n" not in str(error.value)


def test_the_mapper_reports_an_absent_segment_too(panoptic):
    record = dict(crowd_record(panoptic))
    record["segments_info"] = [*record["segments_info"], {**record["segments_info"][0], "id": 424242}]
    with pytest.raises(PanopticDataError, match=r"\d+\.png: segment id\(s\) 424242"):
        mapped(record)


# ---------------------------------------------------------------- the command line
def write_builtin_coco_panoptic(root):
    """detectron2's builtin coco_2017_val_panoptic layout under ``root`` ($DETECTRON2_DATASETS):
    2 JPEG images in coco/val2017, their PNGs in coco/panoptic_val2017 (a person on
    sky and grass), coco/annotations/panoptic_val2017.json with COCO's 133 categories."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    stuff = [c["id"] for c in COCO_CATEGORIES if not c["isthing"]][-2:]
    for folder in ("val2017", "panoptic_val2017", "annotations"):
        (root / "coco" / folder).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in (1, 2):
        name = f"{image_id:012d}"
        ids = np.full((96, 128), 3 * 65793, dtype=np.int64)
        ids[48:] = 2 * 65793
        ids[20:70, 30 + 20 * image_id:70 + 20 * image_id] = 65793
        ids[47:49] = 0  # void border
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "coco" / "panoptic_val2017" / f"{name}.png")
        picture = np.full((96, 128, 3), 90, dtype=np.uint8)
        picture[ids == 65793] = (220, 40, 40)
        Image.fromarray(picture).save(root / "coco" / "val2017" / f"{name}.jpg", quality=95)
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": 128, "height": 96})
        segments = [{"id": k * 65793, "category_id": c, "iscrowd": 0} for k, c in ((1, 1), (2, stuff[0]), (3, stuff[1]))]
        annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments})
    categories = [{k: c[k] for k in ("id", "name", "isthing", "color")} for c in COCO_CATEGORIES]
    (root / "coco" / "annotations" / "panoptic_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


@pytest.mark.slow
def test_train_net_registers_from_the_command_line_trains_and_evaluates_pq(panoptic, tmp_path):
    """tools/train_net.py with REGISTER_COCO_PANOPTIC as KEY VALUE: 2 iterations of a tiny
    panoptic model, then PQ on the val split; a broken set ends in one line naming the PNG;
    detectron2's builtin coco_2017_val_panoptic (its layout under $DETECTRON2_DATASETS)
    trains and evaluates as it is (133 classes)."""
    root, data, json_path = broken_copy(panoptic, tmp_path, "cli_broken")
    pattern = break_absent_segment(root, data)
    json_path.write_text(json.dumps(data))
    register = repr((entry("cli_pan_train", panoptic), entry("cli_pan_val", panoptic, "val")))
    broken = repr((("cli_broken", str(json_path), str(root / "panoptic" / "train"), str(root / "images" / "train")),))
    common = ["MODEL.MASK_ON", "True", "MODEL.DETR.PANOPTIC_ON", "True", "SOLVER.MAX_ITER", "2",
              "MODEL.DETR.HIDDEN_DIM", "128", "MODEL.DETR.NHEADS", "8"]  # sizes the mask head can split
    builtin_root = write_builtin_coco_panoptic(tmp_path / "builtin")  # the $DETECTRON2_DATASETS of all three
    good, bad, builtin = run_concurrently([
        train_net("DATASETS.REGISTER_COCO_PANOPTIC", register, "DATASETS.TRAIN", "('cli_pan_train',)",
                  "DATASETS.TEST", "('cli_pan_val',)", *common, "OUTPUT_DIR", tmp_path / "good"),
        train_net("DATASETS.REGISTER_COCO_PANOPTIC", broken, "DATASETS.TRAIN", "('cli_broken',)",
                  "DATASETS.TEST", "()", *common, "OUTPUT_DIR", tmp_path / "bad"),
        train_net("DATASETS.TRAIN", "('coco_2017_val_panoptic',)", "DATASETS.TEST", "('coco_2017_val_panoptic',)",
                  *common, "OUTPUT_DIR", tmp_path / "builtin_run"),
    ], builtin_root)
    for run, folder, classes in ((good, "good", 9), (builtin, "builtin_run", 133)):
        assert run.returncode == 0, run.output[-4000:]
        assert "Panoptic Evaluation Results" in run.output
        rows = [json.loads(line) for line in (tmp_path / folder / "metrics.json").read_text().splitlines()]
        assert any("panoptic_seg/PQ" in row for row in rows)
        assert f"NUM_CLASSES: {classes}" in (tmp_path / folder / "config.yaml").read_text()
    assert str(panoptic / "panoptic" / "train") in (tmp_path / "good" / "config.yaml").read_text()
    assert re.search(pattern, assert_one_line_error(bad, "000002.png", "777"))
