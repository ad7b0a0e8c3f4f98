"""The evaluator follows the dataset's evaluator_type: tiny generated VOC- and LVIS-format sets
evaluate through detectron2's PascalVOCDetectionEvaluator and LVISEvaluator (perfect
predictions give AP 100, and Trainer.test adds the validation losses); an unknown type is
one clear error."""
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_lvis_instances, register_pascal_voc
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from detr_d2.data.coco_registration import dataset_num_classes
from detr_d2.engine import SetupError, Trainer
from detr_d2.evaluation import check_evaluator_types, detection_evaluator
from detr_d2.evaluation.synthetic_coco import synthetic_ground_truth
from tests.helpers import assert_one_line_error, run_one, tiny_cfg, tiny_model, train_net

IMAGE_SIZE = 96
OBJECTS = {1: [(10, 12, 50, 60, "dog")], 2: [(5, 5, 40, 30, "cat"), (50, 40, 90, 90, "dog")],
           3: [(20, 20, 70, 80, "person")]}  # image id: (x0, y0, x1, y1, class) in pixels
LVIS_CATEGORIES = {"cat": (3, "f"), "dog": (5, "c"), "person": (9, "r")}  # name: (LVIS id, frequency)


def write_image(path):
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(path)


def write_voc(root):
    """A VOC2007-layout folder (JPEGImages, Annotations, ImageSets/Main/test.txt) of OBJECTS."""
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    for image_id, objects in OBJECTS.items():
        write_image(root / "JPEGImages" / f"{image_id:06d}.jpg")
        annotation = ET.Element("annotation")
        size = ET.SubElement(annotation, "size")
        for key, value in (("width", IMAGE_SIZE), ("height", IMAGE_SIZE), ("depth", 3)):
            ET.SubElement(size, key).text = str(value)
        for x0, y0, x1, y1, name in objects:
            obj = ET.SubElement(annotation, "object")
            for key, value in (("name", name), ("pose", "Unspecified"), ("truncated", 0), ("difficult", 0)):
                ET.SubElement(obj, key).text = str(value)
            box = ET.SubElement(obj, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x0, y0, x1, y1)):
                ET.SubElement(box, key).text = str(value)
        ET.ElementTree(annotation).write(root / "Annotations" / f"{image_id:06d}.xml")
    (root / "ImageSets/Main/test.txt").write_text("".join(f"{i:06d}\n" for i in OBJECTS))


def write_lvis(root):
    """An LVIS-v1-format json of OBJECTS (images found through coco_url under root/val2017)."""
    (root / "val2017").mkdir(parents=True)
    images, annotations = [], []
    for image_id, objects in OBJECTS.items():
        write_image(root / "val2017" / f"{image_id:012d}.jpg")
        present = {LVIS_CATEGORIES[name][0] for *_, name in objects}
        images.append({"id": image_id, "height": IMAGE_SIZE, "width": IMAGE_SIZE,
                       "coco_url": f"http://images.example/val2017/{image_id:012d}.jpg",
                       "neg_category_ids": [c for c, _ in LVIS_CATEGORIES.values() if c not in present],
                       "not_exhaustive_category_ids": []})
        for x0, y0, x1, y1, name in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": LVIS_CATEGORIES[name][0], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0),
                                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    categories = [{"id": i, "name": name, "frequency": frequency, "synonyms": [name]}
                  for name, (i, frequency) in LVIS_CATEGORIES.items()]
    path = root / "lvis_v1_tiny.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Registered names of a tiny VOC-format and a tiny LVIS-format test set (evaluator_type
    "pascal_voc" set as detectron2's builtin VOC sets have it, "lvis" by register_lvis_instances)."""
    root = tmp_path_factory.mktemp("evaluator_types")
    write_voc(root / "VOC2007")
    register_pascal_voc("tiny_voc_2007_test", str(root / "VOC2007"), "test", 2007)
    MetadataCatalog.get("tiny_voc_2007_test").evaluator_type = "pascal_voc"  # as detectron2's builtin voc_*
    lvis_json = write_lvis(root / "lvis")
    # "v1" in the name: detectron2 then gives the LVIS v1 metadata (1203 thing_classes)
    register_lvis_instances("tiny_lvis_v1_val", {}, str(lvis_json), str(root / "lvis") + "/")
    return {"pascal_voc": "tiny_voc_2007_test", "lvis": "tiny_lvis_v1_val"}


def perfect_outputs(name):
    """(inputs, outputs) of a model that predicts exactly the dataset's boxes and classes."""
    inputs, outputs = [], []
    for record in DatasetCatalog.get(name):
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record["annotations"]]
        instances = Instances((record["height"], record["width"]), pred_boxes=Boxes(torch.tensor(boxes)),
                              scores=torch.ones(len(boxes)),
                              pred_classes=torch.tensor([a["category_id"] for a in record["annotations"]]))
        inputs.append({"image_id": record["image_id"]})
        outputs.append({"instances": instances})
    return inputs, outputs


@pytest.mark.parametrize("kind, evaluator_class, class_count", [("pascal_voc", PascalVOCDetectionEvaluator, 20),
                                                                 ("lvis", LVISEvaluator, 1203)])
def test_each_type_evaluates_through_its_evaluator(datasets, tmp_path, kind, evaluator_class, class_count):
    name = datasets[kind]
    cfg = tiny_cfg("DATASETS.TEST", (name,), "MODEL.DETR.NUM_CLASSES", class_count, "OUTPUT_DIR", tmp_path)
    evaluator = detection_evaluator(cfg, name, str(tmp_path))
    assert isinstance(evaluator, evaluator_class)
    assert dataset_num_classes(name) == class_count  # what NUM_CLASSES is taken from
    evaluator.reset()
    evaluator.process(*perfect_outputs(name))
    results = evaluator.evaluate()["bbox"]
    if kind == "pascal_voc":  # VOC averages over its 20 classes; the 17 without objects count 0
        assert results["AP50"] == pytest.approx(100.0 * 3 / 20)
    else:  # LVIS averages over the categories of the json
        assert results["AP50"] == pytest.approx(100.0) and {"APr", "APc", "APf"} <= set(results)


@pytest.mark.parametrize("kind, class_count, ap_keys", [("pascal_voc", 20, {"AP", "AP50", "AP75"}),
                                                         ("lvis", 1203, {"AP", "APr", "APc", "APf"})])
def test_trainer_test_gives_each_set_its_ap_and_validation_losses(datasets, tmp_path, kind, class_count, ap_keys):
    name = datasets[kind]
    cfg = tiny_cfg("DATASETS.TEST", (name, "coco_2017_val"), "MODEL.DETR.NUM_CLASSES", class_count,
                   "OUTPUT_DIR", tmp_path)
    cfg.DATASETS.TEST = (name,)
    model = tiny_model("MODEL.DETR.NUM_CLASSES", class_count)
    results = Trainer.test(cfg, model)
    assert ap_keys <= set(results["bbox"])
    assert results["val"]["loss"] > 0 and results["val"]["cardinality_error_unscaled"] >= 0
    assert json.loads((tmp_path / "inference" / f"validation_losses_{name}.json").read_text())["images"] == 3


def test_coco_type_gets_cocoevaluator_with_the_configured_impl(tmp_path):
    (tmp_path / "coco.json").write_text(json.dumps(synthetic_ground_truth(3, num_categories=2)))
    register_coco_instances("tiny_coco_typed", {}, str(tmp_path / "coco.json"), str(tmp_path))
    for impl, fast in (("fast", True), ("official", False)):
        evaluator = detection_evaluator(tiny_cfg("TEST.COCO_EVAL_IMPL", impl), "tiny_coco_typed", str(tmp_path))
        assert isinstance(evaluator, COCOEvaluator) and evaluator._use_fast_impl is fast


def test_unknown_or_missing_type_names_the_dataset_and_the_supported_types():
    MetadataCatalog.get("tiny_cityscapes_like").evaluator_type = "cityscapes_instance"
    DatasetCatalog.register("tiny_untyped", lambda: [])
    for name, described in (("tiny_cityscapes_like", "has evaluator_type 'cityscapes_instance'"),
                            ("tiny_untyped", "has no evaluator_type")):
        with pytest.raises(SetupError) as error:
            check_evaluator_types(["coco_2017_val", name])
        message = str(error.value)
        assert f"Dataset {name!r} in DATASETS.TEST {described}" in message
        assert "'coco', 'lvis', 'pascal_voc'" in message


def test_unknown_type_stops_train_net_before_loading_anything(datasets_root, tmp_path):
    """A builtin set of another kind (cityscapes, its files absent) is refused by its type."""
    run = run_one(train_net("--eval-only", "DATASETS.TEST", "('cityscapes_fine_instance_seg_val',)",
                            "OUTPUT_DIR", tmp_path), datasets_root)
    assert_one_line_error(run, "cityscapes_fine_instance_seg_val", "cityscapes_instance", "'pascal_voc'")
