"""COCO-json datasets from the config: registration, NUM_CLASSES from the data, defects."""
import json

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

import detr_d2
from detr_d2.data import DatasetError, register_datasets_from_config, resolve_num_classes, validate_coco_dataset
from detr_d2.data.shapes import generate_dataset
from tests.helpers import REPO


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A 2-class (star, cross) COCO-json dataset: {split: json path}, and its folder."""
    root = tmp_path_factory.mktemp("shapes")
    paths = generate_dataset(root, ["star", "cross"], {"train": 4, "val": 2}, image_size=64,
                             min_size=12, max_size=30, seed=3)
    return {split: str(path) for split, path in paths.items()}, root


def detr_config(*opts):
    cfg = get_cfg()
    detr_d2.add_detr_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-DETR.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def registration(name, json_file, image_root):
    return ["DATASETS.REGISTER_COCO", repr(((name, json_file, image_root),)),
            "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"]


def test_registration_from_yaml_and_command_line_are_the_same(shapes, tmp_path):
    (paths, root) = shapes
    yaml_file = tmp_path / "custom.yaml"
    yaml_file.write_text(f'_BASE_: "{REPO / "configs" / "Base-DETR.yaml"}"\nDATASETS:\n'
                         f'  REGISTER_COCO: (("yaml_shapes", "{paths["train"]}", "{root}/images/train"),)\n'
                         '  TRAIN: ("yaml_shapes",)\n')
    from_yaml = get_cfg()
    detr_d2.add_detr_config(from_yaml)
    from_yaml.merge_from_file(str(yaml_file))
    from_cli = detr_config(*registration("cli_shapes", paths["train"], f"{root}/images/train"))
    register_datasets_from_config(from_yaml)
    register_datasets_from_config(from_cli)
    yaml_dicts, cli_dicts = DatasetCatalog.get("yaml_shapes"), DatasetCatalog.get("cli_shapes")
    assert len(yaml_dicts) == len(cli_dicts) == 4
    assert [d["annotations"] for d in yaml_dicts] == [d["annotations"] for d in cli_dicts]
    assert MetadataCatalog.get("cli_shapes").thing_classes == ["star", "cross"]


def test_relative_paths_resolve_against_the_working_directory(shapes, monkeypatch):
    (paths, root) = shapes
    monkeypatch.chdir(root)
    cfg = detr_config(*registration("relative_shapes", "annotations/train.json", "images/train"))
    register_datasets_from_config(cfg)
    assert cfg.DATASETS.REGISTER_COCO[0][1] == str(root / "annotations" / "train.json")
    assert len(DatasetCatalog.get("relative_shapes")) == 4


def test_registering_twice_same_files_is_fine_other_files_is_an_error(shapes):
    (paths, root) = shapes
    cfg = detr_config(*registration("twice_shapes", paths["train"], f"{root}/images/train"))
    register_datasets_from_config(cfg)
    register_datasets_from_config(detr_config(*registration("twice_shapes", paths["train"], f"{root}/images/train")))
    other = detr_config(*registration("twice_shapes", paths["val"], f"{root}/images/val"))
    with pytest.raises(DatasetError, match="twice_shapes.*already registered"):
        register_datasets_from_config(other)


def test_num_classes_comes_from_the_data_and_mismatch_names_both_numbers(shapes):
    (paths, root) = shapes
    cfg = detr_config(*registration("count_shapes", paths["train"], f"{root}/images/train"))
    register_datasets_from_config(cfg)
    assert resolve_num_classes(cfg) == 2 and cfg.MODEL.DETR.NUM_CLASSES == 2
    explicit = detr_config(*registration("count_shapes", paths["train"], f"{root}/images/train"),
                           "MODEL.DETR.NUM_CLASSES", "5")
    with pytest.raises(DatasetError, match="NUM_CLASSES is 5 but count_shapes has 2 classes"):
        resolve_num_classes(explicit)


def test_training_sets_with_different_class_counts_are_an_error(shapes, tmp_path):
    (paths, root) = shapes
    data = json.loads(open(paths["train"]).read())
    data["categories"].append({"id": 9, "name": "moon", "supercategory": "shape"})
    three = tmp_path / "three.json"
    three.write_text(json.dumps(data))
    cfg = detr_config("DATASETS.REGISTER_COCO", repr((("two_cls", paths["train"], f"{root}/images/train"),
                                                      ("three_cls", str(three), f"{root}/images/train"))),
                      "DATASETS.TRAIN", "('two_cls', 'three_cls')")
    register_datasets_from_config(cfg)
    with pytest.raises(DatasetError, match="disagree"):
        resolve_num_classes(cfg)


def test_non_contiguous_category_ids_map_to_contiguous_classes(shapes, tmp_path):
    (paths, root) = shapes
    data = json.loads(open(paths["train"]).read())
    remap = {1: 7, 2: 42}
    for category in data["categories"]:
        category["id"] = remap[category["id"]]
    for annotation in data["annotations"]:
        annotation["category_id"] = remap[annotation["category_id"]]
    sparse = tmp_path / "sparse.json"
    sparse.write_text(json.dumps(data))
    cfg = detr_config(*registration("sparse_shapes", str(sparse), f"{root}/images/train"))
    register_datasets_from_config(cfg)
    assert resolve_num_classes(cfg) == 2
    classes = {a["category_id"] for d in DatasetCatalog.get("sparse_shapes") for a in d["annotations"]}
    assert classes <= {0, 1}
    assert MetadataCatalog.get("sparse_shapes").thing_dataset_id_to_contiguous_id == {7: 0, 42: 1}


def defective_copy(paths, tmp_path, edit):
    data = json.loads(open(paths["train"]).read())
    edit(data)
    path = tmp_path / "defective.json"
    path.write_text(json.dumps(data))
    return str(path)


def _first_annotation(data, **changes):
    data["annotations"][0].update(changes)


@pytest.mark.parametrize("edit, handled", [
    (lambda d: _first_annotation(d, bbox=[5, 5, 0, 10]), "zero-size boxes (dropped)"),
    (lambda d: _first_annotation(d, bbox=[50, 50, 40, 40]), "boxes beyond the image (clipped)"),
    (lambda d: _first_annotation(d, iscrowd=1), "crowd objects (ignored in training)"),
    (lambda d: d["annotations"].__setitem__(slice(None), [a for a in d["annotations"] if a["image_id"] != 1]),
     "images without annotations (kept)"),
    (lambda d: d["categories"].append({"id": 3, "name": "moon"}), "categories without annotations"),
])
def test_tolerated_defects_are_counted(shapes, tmp_path, edit, handled):
    (paths, root) = shapes
    report = validate_coco_dataset("defects", defective_copy(paths, tmp_path, edit), f"{root}/images/train")
    assert report.get(handled, 0) >= 1


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["images"].append(dict(d["images"][0])), "image id\\(s\\) listed more than once: 1"),
    (lambda d: d["images"].append({"id": 99, "file_name": "gone.png", "width": 64, "height": 64}),
     "missing.*gone.png \\(id 99\\)"),
    (lambda d: _first_annotation(d, bbox=[1, 2, 3]), "bbox \\[1, 2, 3\\]"),
    (lambda d: _first_annotation(d, image_id=12345), "refer to images not in 'images'"),
    (lambda d: _first_annotation(d, category_id=77), "category_id not in 'categories'"),
])
def test_fatal_defects_name_the_file_and_id(shapes, tmp_path, edit, message):
    (paths, root) = shapes
    path = defective_copy(paths, tmp_path, edit)
    with pytest.raises(DatasetError, match=message) as error:
        validate_coco_dataset("defects", path, f"{root}/images/train")
    assert "defective.json" in str(error.value)


def test_unparsable_json_names_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DatasetError, match="broken.json is not valid JSON"):
        validate_coco_dataset("broken", str(broken), str(tmp_path))
