"""What the tests share: paths, generated COCO-layout data, subprocess runners of the real
command-line tools, configs and models of the repository's configs and of the reference
fixtures in ../shared/fixtures.

Test data for the training tests is laid out as detectron2's builtin COCO datasets expect
it (datasets/README.md) under a temporary $DETECTRON2_DATASETS (the ``datasets_root``
fixture of conftest.py), so ``coco_2017_train`` / ``coco_2017_val`` name it: 128x128 images
with one or two filled rectangles of one class per image (person, bicycle, car, person,
... by image id; drawn red, green, blue). The json lists all 80 COCO categories (the
builtin names' metadata expects them), so MODEL.DETR.NUM_CLASSES is 80.

Most robustness runs end in an error message after a few seconds of imports, so
independent runs are started together (``run_concurrently``).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

import detr_d2  # noqa: F401  (compat fixes before detectron2's data package)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from detr_d2 import add_detr_config
from detr_d2.data import resolve_num_classes
from detr_d2.data.shapes import generate_panoptic_dataset
from detr_d2.engine import merge_config

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
TOOLS = REPO / "tools"


# ---------------------------------------------------------------- COCO-layout data, CLI runs
TRAIN_NET = TOOLS / "train_net.py"
TINY_CONFIG = REPO / "configs" / "tests" / "tiny.yaml"
IMAGE_SIZE = 128
CLASS_COLOURS = {1: (220, 40, 40), 2: (40, 200, 40), 3: (40, 40, 220)}  # COCO ids 1-3
BACKGROUND = (128, 128, 128)


def _random_boxes(rng, count):
    """``count`` non-overlapping boxes [x, y, w, h] (pixels) of 28-56 px inside the image."""
    boxes = []
    while len(boxes) < count:
        w, h = rng.integers(28, 57, size=2)
        x, y = rng.integers(0, IMAGE_SIZE - w), rng.integers(0, IMAGE_SIZE - h)
        if all(x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y
               for bx, by, bw, bh in boxes):
            boxes.append([int(x), int(y), int(w), int(h)])
    return boxes


def _image_category(image_id):
    """Every object of an image has one class, cycling with the image id (1, 2, 3, 1, ...).

    Images then differ in colour as a whole, and a small DETR trained from scratch tells
    them apart within its first iterations; when two images hold the same classes at
    different places, it first predicts the union of their boxes on both (measured).
    """
    return sorted(CLASS_COLOURS)[(image_id - 1) % len(CLASS_COLOURS)]


def _draw(boxes, category_ids):
    """HxWx3 uint8 image: the background with each box filled in its class colour."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = BACKGROUND
    for (x, y, w, h), category_id in zip(boxes, category_ids):
        image[y:y + h, x:x + w] = CLASS_COLOURS[category_id]
    return image


def rectangle_segmentation(box, as_rle):
    """COCO "segmentation" of a filled [x, y, w, h] box: a polygon, or a compressed RLE
    (counts as a string) of the IMAGE_SIZE x IMAGE_SIZE image."""
    x, y, w, h = box
    if not as_rle:
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[y:y + h, x:x + w] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_coco_split(coco_dir, split, num_images, seed, with_masks=False):
    """Write ``coco_dir/<split>/*.png`` and ``coco_dir/annotations/instances_<split>.json``;
    ``with_masks``: each annotation also has the "segmentation" of its filled box, a
    polygon on odd image ids and an RLE on even ones."""
    rng = np.random.default_rng(seed)
    (coco_dir / split).mkdir(parents=True)
    (coco_dir / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        boxes = _random_boxes(rng, int(rng.integers(1, 3)))
        category_ids = [_image_category(image_id)] * len(boxes)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(_draw(boxes, category_ids)).save(coco_dir / split / file_name)
        images.append({"id": image_id, "file_name": file_name,
                       "height": IMAGE_SIZE, "width": IMAGE_SIZE})
        for box, category_id in zip(boxes, category_ids):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
            if with_masks:
                annotations[-1]["segmentation"] = rectangle_segmentation(box, as_rle=image_id % 2 == 0)
    categories = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (coco_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def subprocess_env(datasets_root):
    """The environment of a training subprocess: the test data as $DETECTRON2_DATASETS.

    One torch thread per process: with any other load on the (2-core) machine, torch's
    default of one thread per core makes OpenMP's waiting threads slow each step several
    times over (measured on busy cores: 7.9 s per tiny step with 2 threads, 0.9 s with 1),
    and these tiny models gain little from a second thread anyway.
    """
    return dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), PYTHONWARNINGS="ignore",
                OMP_NUM_THREADS="1")


def run_python(args, datasets_root, timeout=300):
    """Run ``python ARGS`` from the repository root; the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO,
                          env=subprocess_env(datasets_root), capture_output=True, text=True,
                          timeout=timeout)


def run_train_net(args, datasets_root, timeout=300):
    """Run ``tools/train_net.py ARGS``; the CompletedProcess (text output)."""
    return run_python([TRAIN_NET, *args], datasets_root, timeout)


def trains_in_subprocess(fixture_function):
    """Decorate a fixture function (below ``@pytest.fixture``) that trains in a subprocess:
    conftest.py marks every test using it slow (out of ``make test-quick``)."""
    fixture_function.trains_in_subprocess = True
    return fixture_function


def read_metrics(output_dir):
    """The rows of ``output_dir/metrics.json`` (one json object per line)."""
    lines = Path(output_dir, "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------- concurrent CLI runs, tiny models


@dataclass
class Run:
    """The outcome of one subprocess: exit status, output, wall time until it ended."""

    args: list
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self):
        return self.stdout + self.stderr


def run_concurrently(commands, datasets_root, timeout=600):
    """Start ``python ARGS`` for every argument list of ``commands`` at once (from the
    repository root, the test data as $DETECTRON2_DATASETS); their ``Run``s, in order.

    Output goes to temporary files, so that no process waits on a full pipe.
    """
    env = subprocess_env(datasets_root)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        processes = []
        for index, args in enumerate(commands):
            out = open(os.path.join(folder, f"{index}.out"), "w+")
            err = open(os.path.join(folder, f"{index}.err"), "w+")
            process = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env,
                                       stdout=out, stderr=err, text=True)
            processes.append((args, process, out, err))
        ended = {}
        while len(ended) < len(processes):
            for index, (_, process, _, _) in enumerate(processes):
                if index not in ended and process.poll() is not None:
                    ended[index] = time.monotonic() - started
            if time.monotonic() - started > timeout:
                for _, process, _, _ in processes:
                    process.kill()
                raise TimeoutError(f"subprocesses still running after {timeout} s: {commands}")
            time.sleep(0.05)
        runs = []
        for index, (args, process, out, err) in enumerate(processes):
            out.seek(0), err.seek(0)
            runs.append(Run([str(a) for a in args], process.returncode, out.read(), err.read(),
                            ended[index]))
            out.close(), err.close()
    return runs


def run_one(args, datasets_root, timeout=600):
    """``run_concurrently`` of a single command: its Run."""
    return run_concurrently([args], datasets_root, timeout)[0]


def assert_one_line_error(run, *culprits, exit_code=None):
    """Non-zero exit (``exit_code`` if given); one "ERROR" line naming every culprit; no
    traceback anywhere in the output. Returns that line."""
    output = run.output
    assert run.returncode != 0, output[-3000:]
    if exit_code is not None:
        assert run.returncode == exit_code, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    lines = [line for line in output.splitlines() if "ERROR" in line and all(c in line for c in culprits)]
    assert lines, f"no ERROR line names all of {culprits}:\n{output[-3000:]}"
    return lines[-1]


def assert_succeeded(run):
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


def tiny_cfg(*opts):
    """configs/tests/tiny.yaml with ``KEY VALUE`` overrides (not frozen), NUM_CLASSES from
    its datasets' metadata (80) when unset, as build_config does."""
    cfg = merge_config(add_detr_config(get_cfg()), str(TINY_CONFIG), [str(o) for o in opts])
    if cfg.MODEL.DETR.NUM_CLASSES is None:
        resolve_num_classes(cfg)
    return cfg


def tiny_model(*opts):
    """A randomly initialised model of ``tiny_cfg(*opts)`` (seeded), on the CPU."""
    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts))


def padded_image_batch(model):
    """ImageList of two seeded random uint8 images of different sizes (128x96, 112x128),
    normalised and padded by ``model.preprocess_image``."""
    torch.manual_seed(3)
    return model.preprocess_image([{"image": torch.randint(0, 255, (3, 128, 96), dtype=torch.uint8)},
                                   {"image": torch.randint(0, 255, (3, 112, 128), dtype=torch.uint8)}])


def save_weights(model, path):
    """Write ``{"model": state_dict}`` of ``model`` to ``path``, as a trained run would."""
    torch.save({"model": model.state_dict()}, path)
    return path


def train_net(*args):
    """Argument list running tools/train_net.py on configs/tests/tiny.yaml with ``args``."""
    return [TOOLS / "train_net.py", "--config-file", TINY_CONFIG, *args]


# ---------------------------------------------------------------- repository configs
def merged_config(name, *opts):
    """configs/``name`` with ``opts`` on detectron2's and detr_d2's defaults, on the CPU."""
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def config(name, *opts):
    """``merged_config`` with NUM_CLASSES taken from the datasets when unset, as build_config does."""
    cfg = merged_config(name, *opts)
    if cfg.MODEL.DETR.NUM_CLASSES is None:
        resolve_num_classes(cfg)
    return cfg


def parameter_counts(model):
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def small_config(*opts):
    return config("detr_r50.yaml", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                  "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.ENC_LAYERS", "1",
                  "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.NUM_OBJECT_QUERIES", "7", "MODEL.DETR.NUM_CLASSES", "3",
                  *opts)


def training_input(height, width, boxes, classes):
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8), "instances": instances}


def rectangle_polygon(box):
    """The polygon [x0, y0, x1, y0, x1, y1, x0, y1] of an xyxy box, as detectron2 lists them."""
    x0, y0, x1, y1 = box
    return [np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]


MASKED_BATCH_BOXES = ([[4, 6, 30, 40], [40, 10, 70, 60]], [[2, 3, 40, 30]])


def batch_with_masks(as_bitmasks=False):
    """Two training inputs (64x80 and 48x64 random images) whose instances carry rectangle
    masks filling their boxes, as PolygonMasks or BitMasks."""
    torch.manual_seed(0)
    batch = [training_input(64, 80, MASKED_BATCH_BOXES[0], [0, 2]),
             training_input(48, 64, MASKED_BATCH_BOXES[1], [1])]
    for item, boxes in zip(batch, MASKED_BATCH_BOXES):
        height, width = item["image"].shape[1:]
        polygons = PolygonMasks([rectangle_polygon(box) for box in boxes])
        item["instances"].gt_masks = (BitMasks.from_polygon_masks(polygons, height, width)
                                      if as_bitmasks else polygons)
    return batch


# ---------------------------------------------------------------- reference fixtures


def fixture_dir(name):
    """Path of a shared fixture, or skip the test with the reason."""
    path = FIXTURES / name
    if not (path / "checkpoint.pth").is_file():
        pytest.skip(f"fixture {path} is absent (it lives in ../shared beside the repository)")
    return path


def config_for_fixture(path):
    """A detectron2 config reproducing the fixture's config.json on top of Base-DETR.yaml."""
    spec = json.loads((path / "config.json").read_text())
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-DETR.yaml"))
    depth = int(spec["backbone"].replace("resnet", ""))
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.RES5_DILATION = 2 if spec["dilation"] else 1
    detr = cfg.MODEL.DETR
    detr.HIDDEN_DIM, detr.NHEADS = spec["hidden"], spec["nheads"]
    detr.ENC_LAYERS, detr.DEC_LAYERS = spec["enc"], spec["dec"]
    detr.DIM_FEEDFORWARD, detr.NUM_OBJECT_QUERIES = spec["ff"], spec["queries"]
    detr.DROPOUT, detr.PRE_NORM = spec["dropout"], spec["pre_norm"]
    detr.NUM_CLASSES = 80 if spec["num_classes"] == 91 else spec["num_classes"]
    detr.NO_OBJECT_WEIGHT = spec["eos_coef"]
    cfg.MODEL.MASK_ON = "mask_head_dims" in spec  # a DETRsegm fixture
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def convert_with_cli(source, output, *extra):
    """Run tools/convert_detr_checkpoint.py in a subprocess; returns the CompletedProcess."""
    command = [sys.executable, str(REPO / "tools" / "convert_detr_checkpoint.py"),
               "--source", str(source), "--output", str(output), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def converted_fixture_model(name, converted_reference):
    """(model in eval mode loaded from the converter CLI's output, inputs, expected) of a
    fixture; ``converted_reference`` is conftest.py's fixture of that name."""
    path = fixture_dir(name)
    model = build_model(config_for_fixture(path))
    DetectionCheckpointer(model).load(str(converted_reference(name)[0]))
    model.eval()
    inputs = torch.load(path / "inputs.pt", weights_only=True)
    expected = torch.load(path / "expected.pt", weights_only=True)
    return model, inputs, expected


def panoptic_fixture_config(root, things, splits, dataset, converted_reference, seed=5):
    """(config, data folder): the converted reference DETRsegm fixture (6 classes; from
    conftest.py's ``converted_reference``) with PANOPTIC_ON on panoptic shapes generated in
    ``root``/shapes (``things`` + sky / ground / water, ``splits`` {name: count}); the val
    split registered as ``dataset`` and made the training set, so its metadata names the
    classes."""
    data = root / "shapes"
    generate_panoptic_dataset(data, things, splits, seed=seed)
    fixture = fixture_dir("detr_upstream_segm_tiny")
    cfg = config_for_fixture(fixture)
    cfg.MODEL.WEIGHTS = str(converted_reference("detr_upstream_segm_tiny")[0])
    cfg.MODEL.DETR.NUM_CLASSES = None
    cfg.MODEL.DETR.PANOPTIC_ON = True
    cfg.DATASETS.REGISTER_COCO_PANOPTIC = ((dataset, str(data / "annotations" / "panoptic_val.json"),
                                            str(data / "panoptic" / "val"), str(data / "images" / "val")),)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 112, 400
    return cfg, data


def chw_images(inputs):
    """The fixture's HWC uint8 RGB images as CHW uint8 tensors."""
    return [image.permute(2, 0, 1).contiguous() for image in inputs["images_hwc_uint8_rgb"]]


# A sitecustomize-like prologue: torch and friends cannot be imported; the tool named by
# the first argument runs as __main__; at exit the modules of those packages that were
# imported (there must be none) are printed.
TORCH_FREE_RUNNER = """
import importlib.abc, runpy, sys
BLOCKED = ("torch", "torchvision", "detectron2", "detr_d2")
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} cannot be imported in this test")
sys.meta_path.insert(0, Refuse())
tool, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(tool, run_name="__main__")
    code = 0
except SystemExit as exit:
    code = exit.code
print("IMPORTED:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
sys.exit(code)
"""


def run_torch_free(tool, *args):
    """Run ``tools/<tool> ARGS`` where torch, detectron2 and detr_d2 cannot be imported."""
    return subprocess.run([sys.executable, "-c", TORCH_FREE_RUNNER, str(TOOLS / tool), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
