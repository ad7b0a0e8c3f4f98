"""Unusual and broken image files in the training mapper, the evaluation loader and
tools/demo.py.

Each usable file (grayscale, RGBA, palette, 16-bit PNG, EXIF-rotated JPEG, 1x1, 12000x9000)
becomes a 3-channel image with its box on the object's pixels; each broken one (empty file,
text named .jpg) is an error naming the file (and in training the dataset), or in the demo
a skipped input with the reason.
"""
import json
import resource
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode
from PIL import Image

from detr_d2.data import DetrDatasetMapper
from detr_d2.data.image_io import BadImageError
from tests.helpers import (
    TOOLS,
    assert_one_line_error,
    assert_succeeded,
    run_concurrently,
    save_weights,
    tiny_cfg,
    tiny_model,
    train_net,
)

WIDTH, HEIGHT = 60, 40             # displayed frame of the small images
BOX = (10, 8, 20, 24)              # x, y, w, h of the object in that frame
BACKGROUND, OBJECT = (128, 128, 128), (220, 40, 40)
BIG_SIZE, BIG_BOX = (12000, 9000), (3000, 2000, 3000, 2000)


def scene(width=WIDTH, height=HEIGHT, box=BOX, colour=OBJECT):
    """HxWx3 uint8 RGB: background with the object box filled."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUND
    x, y, w, h = box
    image[y:y + h, x:x + w] = colour
    return image


def write_png_rows(path, width, height, rows):
    """Write an 8-bit RGB PNG whose row y is ``rows(y)`` (bytes), compressing row by row:
    a 12000x9000 image costs a few MB of memory to write instead of 324 MB."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    compressor = zlib.compressobj(1)
    data = b"".join(compressor.compress(b"\0" + rows(y)) for y in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def write_big(path):
    (width, height), (x, y, w, h) = BIG_SIZE, BIG_BOX
    plain = bytes(BACKGROUND) * width
    boxed = bytes(BACKGROUND) * x + bytes(OBJECT) * w + bytes(BACKGROUND) * (width - x - w)
    write_png_rows(path, width, height, lambda row: boxed if y <= row < y + h else plain)


def write_exif_rotated(path):
    """A JPEG stored 40 wide x 60 high with EXIF orientation 6 ("rotate 90 degrees clockwise
    to display"): displayed, it is ``scene()``, in whose frame the annotation is given."""
    stored = Image.fromarray(scene()).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)


# kind: (file name, writer, displayed (width, height), box, object colour after reading)
GRAY = (220, 220, 220)
GOOD_IMAGES = {
    "grayscale": ("gray.png", lambda p: Image.fromarray(scene()[:, :, 0].copy()).save(p), GRAY),
    "rgba": ("rgba.png", lambda p: Image.fromarray(np.dstack([scene(), np.full((HEIGHT, WIDTH), 90, np.uint8)]),
                                                    "RGBA").save(p), OBJECT),
    "palette": ("palette.png", lambda p: Image.fromarray(scene()).convert("P", palette=Image.Palette.ADAPTIVE,
                                                                          colors=4).save(p), OBJECT),
    "16_bit": ("sixteen.png", lambda p: Image.fromarray(scene()[:, :, 0].astype(np.uint16) * 257).save(p), GRAY),
    "exif_rotated": ("rotated.jpg", write_exif_rotated, OBJECT),
    "1x1": ("dot.png", lambda p: Image.fromarray(scene(1, 1, (0, 0, 1, 1))).save(p), OBJECT),
    "12000x9000": ("big.png", write_big, OBJECT),
}
SIZES = {"1x1": ((1, 1), (0, 0, 1, 1)), "12000x9000": (BIG_SIZE, BIG_BOX)}
BROKEN_IMAGES = {"empty.jpg": b"", "notes.jpg": b"holiday notes, not a picture\n"}


def size_and_box(kind):
    return SIZES.get(kind, ((WIDTH, HEIGHT), BOX))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Folder holding every GOOD_IMAGES and BROKEN_IMAGES file."""
    folder = tmp_path_factory.mktemp("odd_images")
    for name, write, _ in GOOD_IMAGES.values():
        write(folder / name)
    for name, content in BROKEN_IMAGES.items():
        (folder / name).write_bytes(content)
    assert Image.open(folder / "sixteen.png").mode == "I;16"
    assert Image.open(folder / "palette.png").mode == "P"
    return folder


def record(folder, file_name, size, box, image_id=1):
    (width, height) = size
    return {"file_name": str(folder / file_name), "width": width, "height": height, "image_id": image_id,
            "dataset_name": "odd_train",
            "annotations": [{"bbox": list(box), "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0}]}


def mapper():
    return DetrDatasetMapper(tiny_cfg("MODEL.DETR.NUM_CLASSES", 1), is_train=True)


def mean_colour(chw, x0, y0, x1, y1):
    return chw[:, y0:y1, x0:x1].reshape(3, -1).float().mean(dim=1).tolist()


# ---------------------------------------------------------------- training mapper, in-process
@pytest.mark.parametrize("kind", list(GOOD_IMAGES))
def test_mapper_reads_the_file_as_rgb_with_the_box_on_the_object(kind, images):
    file_name, _, colour = GOOD_IMAGES[kind]
    size, box = size_and_box(kind)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    output = mapper()(record(images, file_name, size, box))
    seconds = time.monotonic() - started
    peak_rise_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    image, boxes = output["image"], output["instances"].gt_boxes.tensor
    scale = min(128 / min(size), 128 / max(size))  # ResizeShortestEdge(128, max 128) of tiny.yaml
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert tuple(image.shape[1:]) == (round(size[1] * scale), round(size[0] * scale))
    x, y, w, h = box
    assert len(boxes) == 1
    assert boxes[0].tolist() == pytest.approx([x * scale, y * scale, (x + w) * scale, (y + h) * scale], abs=0.5)
    x0, y0, x1, y1 = (int(round(v)) for v in boxes[0].tolist())
    margin = 3 if kind != "1x1" else 0
    assert mean_colour(image, x0 + margin, y0 + margin, x1 - margin, y1 - margin) == pytest.approx(colour, abs=12)
    if kind != "1x1":  # the background left of the box
        assert mean_colour(image, 0, y0 + margin, max(x0 - margin, 1), y1 - margin) == pytest.approx(
            BACKGROUND, abs=12)
    print(f"{kind}: mapped in {seconds:.2f} s, peak resident memory of the process rose by {peak_rise_mb:.0f} MB")


@pytest.mark.parametrize("name, reason", [("empty.jpg", "not a decodable image"),
                                          ("notes.jpg", "not a decodable image")])
def test_mapper_names_file_image_and_dataset_of_a_broken_file(images, name, reason):
    with pytest.raises(BadImageError) as error:
        mapper()(record(images, name, (WIDTH, HEIGHT), BOX, image_id=42))
    message = str(error.value)
    for part in (str(images / name), "image_id 42", "dataset 'odd_train'", reason, "Replace the file"):
        assert part in message, message


def test_record_in_the_stored_frame_of_an_exif_image_is_a_clear_error(images):
    with pytest.raises(BadImageError, match=r"rotated.jpg .*is 60x40 pixels .*after EXIF orientation.* "
                                            r"record says 40x60"):
        mapper()(record(images, "rotated.jpg", (HEIGHT, WIDTH), BOX))


# ---------------------------------------------------------------- the real tools
def write_coco(path, folder, file_names):
    """A one-class COCO json of ``file_names`` in ``folder`` (boxes per GOOD_IMAGES; broken
    files get the small-image size and box)."""
    kinds = {name: kind for kind, (name, _, _) in GOOD_IMAGES.items()}
    images, annotations = [], []
    for image_id, name in enumerate(file_names, 1):
        (width, height), box = size_and_box(kinds.get(name))
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "bbox": list(box),
                            "area": box[2] * box[3], "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "object"}]}))
    return path


@pytest.fixture(scope="module")
def cli(images, datasets_root, tmp_path_factory):
    """{case: Run} of evaluation, training and demo runs on the odd images, run at once."""
    root = tmp_path_factory.mktemp("images_cli")
    weights = save_weights(tiny_model("MODEL.DETR.NUM_CLASSES", 1), root / "one_class.pth")
    good = [name for name, _, _ in GOOD_IMAGES.values()]
    small = [name for name in good if name != "big.png"]

    def dataset(name, files):
        return ["DATASETS.REGISTER_COCO",
                f"(('{name}', '{write_coco(root / (name + '.json'), images, files)}', '{images}'),)"]

    training = ["SOLVER.MAX_ITER", 40, "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", 1]
    commands = {
        "evaluate": train_net("--eval-only", "OUTPUT_DIR", root / "eval", "MODEL.WEIGHTS", weights,
                              *dataset("odd_val", good), "DATASETS.TRAIN", "()", "DATASETS.TEST", "('odd_val',)"),
        "train_text_jpg": train_net("OUTPUT_DIR", root / "text", *dataset("odd_train", small + ["notes.jpg"]),
                                    "DATASETS.TRAIN", "('odd_train',)", *training),
        "train_empty_jpg": train_net("OUTPUT_DIR", root / "empty", *dataset("odd_empty", small + ["empty.jpg"]),
                                     "DATASETS.TRAIN", "('odd_empty',)", *training),
        "demo": [TOOLS / "demo.py", "--config-file", TOOLS.parent / "configs/tests/tiny.yaml", "--input", images,
                 "--output", root / "drawn", "--confidence-threshold", 0.0, "--opts", "MODEL.WEIGHTS", weights,
                 "MODEL.DETR.NUM_CLASSES", 1, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"],
    }
    runs = dict(zip(commands, run_concurrently(list(commands.values()), datasets_root)))
    return runs, root


def test_evaluation_reads_every_usable_image(cli):
    runs, _ = cli
    assert_succeeded(runs["evaluate"])
    assert "Evaluation results for bbox" in runs["evaluate"].output


def test_training_stops_at_an_undecodable_image_naming_file_and_dataset(cli, images):
    runs, root = cli
    assert_one_line_error(runs["train_text_jpg"], f"Cannot read image {images / 'notes.jpg'}",
                          "of dataset 'odd_train'", "not a decodable image", "Replace the file")
    assert not (root / "text" / "model_final.pth").exists()


def test_training_refuses_an_empty_image_file_before_starting(cli, images):
    runs, _ = cli
    run = runs["train_empty_jpg"]
    assert_one_line_error(run, "Dataset 'odd_empty'", "empty (0 bytes)", str(images / "empty.jpg"))
    assert "Starting training" not in run.output


def test_demo_draws_every_usable_image_and_skips_the_broken_ones(cli, images):
    runs, root = cli
    run = runs["demo"]
    assert run.returncode == 1 and "Traceback" not in run.output, run.output[-3000:]
    assert "2 of 9 inputs failed and were skipped" in run.output
    for name in BROKEN_IMAGES:
        assert any(str(images / name) in line and "not a decodable image" in line
                   for line in run.output.splitlines()), run.output[-3000:]
    for kind, (name, _, colour) in GOOD_IMAGES.items():
        drawn = cv2.imread(str(root / "drawn" / (name.rsplit(".", 1)[0] + ".png")), cv2.IMREAD_COLOR)
        (width, height), _ = size_and_box(kind)
        expected = (3072, 4096) if kind == "12000x9000" else (height, width)  # drawn at <= 4096 px
        assert drawn.shape == (*expected, 3), kind
        if kind in ("grayscale", "16_bit"):  # a 16-bit file read by clipping would be white here
            assert drawn[1, -2].tolist() == pytest.approx(list(BACKGROUND), abs=3), kind
    records = json.loads((root / "drawn" / "predictions.json").read_text())
    big = [r["bbox"] for r in records if r["file_name"].endswith("big.png")]
    assert big and max(x + w for x, _, w, _ in big) <= BIG_SIZE[0] + 1, "boxes in the original pixels"
