"""detr_d2_deploy's numpy steps equal what tools/demo.py runs in torch/detectron2: image
reading, test-time resize, normalisation, padding, post-processing."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T
from detectron2.structures import ImageList
from PIL import Image

from detr_d2.data.image_io import read_image as detr_d2_read_image
from detr_d2.modeling.multi_scale.topk_postprocess import topk_results_for_batch
from detr_d2.modeling.postprocess import binary_masks as binary_masks_torch
from detr_d2.modeling.postprocess import detections_to_instances
from detr_d2_deploy.detections import binary_masks, detections_from_outputs, sigmoid
from detr_d2_deploy.errors import DeployError, UnreadableImage
from detr_d2_deploy.images import network_input_size, normalised, padded_batch, read_image, resized
from detr_d2_deploy.spec import EXPORT_FILE, SIGMOID_TOPK, SOFTMAX, ExportSpec, read_spec

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def write_images(folder):
    """Image files in the formats tools/demo.py accepts: RGB, grayscale, RGBA, palette,
    16-bit, EXIF-rotated JPEG."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb[:, :, 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 65536, (37, 53)).astype(np.uint16)).save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown turned by 90 degrees
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    return sorted(folder.iterdir())


@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
def test_read_image_equals_the_tools_reader(tmp_path, channel_order):
    for path in write_images(tmp_path):
        expected = detr_d2_read_image(str(path), format=channel_order)
        assert np.array_equal(read_image(str(path), channel_order), expected), path.name
    assert read_image(str(tmp_path / "rotated.jpg")).shape == (53, 37, 3)


def test_unreadable_images_say_why(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImage, match="not a decodable image"):
        read_image(str(tmp_path / "empty.jpg"))
    with pytest.raises(UnreadableImage, match="file does not exist"):
        read_image(str(tmp_path / "missing.png"))


def test_resize_equals_detectron2_resize_shortest_edge():
    rng = np.random.default_rng(1)
    for height, width, shortest, longest in [(480, 640, 800, 1333), (1001, 333, 800, 1333), (97, 131, 128, 128),
                                             (300, 300, 128, 1000), (61, 87, 0, 1333)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        augmentation = T.ResizeShortestEdge(shortest, longest, "choice")
        expected = augmentation.get_transform(image).apply_image(image)
        assert network_input_size(height, width, shortest, longest) == expected.shape[:2]
        assert np.array_equal(resized(image, shortest, longest), expected)


def test_normalised_padded_batch_equals_detr_preprocessing():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(45, 70, 3), (66, 31, 3)]]
    batch, sizes = padded_batch([normalised(image, MEAN, STD) for image in images])
    mean, std = torch.tensor(MEAN).view(-1, 1, 1), torch.tensor(STD).view(-1, 1, 1)
    expected = ImageList.from_tensors([(torch.from_numpy(i.transpose(2, 0, 1).copy()) - mean) / std for i in images])
    assert np.array_equal(batch, expected.tensor.numpy())
    assert sizes.tolist() == [list(s) for s in expected.image_sizes] and sizes.dtype == np.int64


def test_detections_equal_detr_postprocessing():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (10, 5)).astype(np.float32)
    boxes = rng.uniform(0, 1, (10, 4)).astype(np.float32)  # some reach past the image: clipped
    detections = detections_from_outputs(logits, boxes, (375, 500))
    instances = detections_to_instances(torch.from_numpy(logits), torch.from_numpy(boxes), (375, 500))
    np.testing.assert_allclose(detections.boxes, instances.pred_boxes.tensor.numpy(), atol=1e-4)
    np.testing.assert_allclose(detections.scores, instances.scores.numpy(), atol=1e-6)
    assert np.array_equal(detections.labels, instances.pred_classes.numpy())
    kept = detections.confident(float(np.median(detections.scores)))
    assert len(kept) == (detections.scores >= np.median(detections.scores)).sum() >= 5


def test_sigmoid_equals_torch_without_overflow():
    logits = np.array([-1e4, -104.0, -88.0, -20.0, -1.5, 0.0, 0.3, 17.0, 1e4], np.float32)
    with np.errstate(over="raise", invalid="raise"):
        probabilities = sigmoid(logits)
    np.testing.assert_allclose(probabilities, torch.from_numpy(logits).sigmoid().numpy(), rtol=1e-6, atol=1e-30)
    assert probabilities.dtype == np.float32


@pytest.mark.parametrize("k", [20, 500])  # fewer than the Q x K = 210 pairs, and more
def test_topk_detections_equal_the_sigmoid_topk_postprocessing(k):
    rng = np.random.default_rng(5)
    logits = rng.normal(-2, 2, (30, 7)).astype(np.float32)
    boxes = rng.uniform(0, 1, (30, 4)).astype(np.float32)
    detections = detections_from_outputs(logits, boxes, (375, 500), topk=k)
    expected = topk_results_for_batch(torch.from_numpy(logits)[None], torch.from_numpy(boxes)[None],
                                      [{"height": 375, "width": 500}], [(150, 200)], k)[0]["instances"]
    assert len(detections) == len(expected) == min(k, 210)
    assert np.array_equal(detections.labels, expected.pred_classes.numpy())
    np.testing.assert_allclose(detections.scores, expected.scores.numpy(), rtol=1e-6)
    np.testing.assert_allclose(detections.boxes, expected.pred_boxes.tensor.numpy(), atol=1e-4)
    assert np.all(np.diff(detections.scores) <= 0)


@pytest.mark.parametrize("output_size", [(61, 83), (130, 171), (40, 33)])  # as is, upscaled, downscaled
def test_binary_masks_equal_detr_mask_postprocessing_away_from_the_threshold(output_size):
    torch.manual_seed(4)
    mask_logits = torch.randn(5, 24, 30) * 3
    padded_size, image_size, threshold = (96, 120), (61, 83), 0.5
    expected = binary_masks_torch(mask_logits, padded_size, image_size, output_size, threshold).numpy()
    masks = binary_masks(mask_logits.numpy(), padded_size, image_size, output_size, threshold)
    upsampled = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)[0]
    cropped = upsampled.sigmoid()[:, :image_size[0], :image_size[1]]
    probabilities = F.interpolate(cropped[None], size=output_size, mode="nearest")[0].numpy()
    assert masks.shape == expected.shape == (5, *output_size) and 0.2 < expected.mean() < 0.8
    assert not ((masks != expected) & (np.abs(probabilities - threshold) > 1e-3)).any()


def spec(**changes):
    fields = dict(format="onnx", channel_order="RGB", pixel_mean=MEAN, pixel_std=STD, shortest_edge=800,
                  max_size=1333, num_queries=900, num_classes=80, class_names=None, category_ids=None,
                  score_threshold=0.5)
    return ExportSpec(**{**fields, **changes})


def write_export_json(folder, data):
    (folder / EXPORT_FILE).write_text(json.dumps(data))
    return str(folder)


def test_export_json_says_which_post_processing_and_reads_back(tmp_path):
    topk = spec(classification=SIGMOID_TOPK, topk=300)
    data = topk.to_json()
    assert data["postprocessing"]["classification"] == "sigmoid_topk" and data["postprocessing"]["topk"] == 300
    assert data["outputs"][0]["shape"] == ["batch", 900, 80]
    assert read_spec(write_export_json(tmp_path, data)) == topk
    softmax = spec().to_json()
    assert softmax["postprocessing"]["classification"] == "softmax" and "topk" not in softmax["postprocessing"]
    assert softmax["outputs"][0]["shape"] == ["batch", 900, 81]


def test_a_version_1_export_json_is_a_softmax_export(tmp_path):
    data = spec().to_json()
    data["format_version"] = 1
    del data["postprocessing"]["classification"]
    read = read_spec(write_export_json(tmp_path, data))
    assert read.classification == SOFTMAX and read.topk is None and read.num_logits == 81


@pytest.mark.parametrize("postprocessing, culprit", [({"classification": "argmax"}, "'argmax'"),
                                                     ({"classification": "sigmoid_topk"}, "topk None")])
def test_an_unknown_post_processing_is_refused_naming_it(tmp_path, postprocessing, culprit):
    data = spec().to_json()
    data["postprocessing"].update(postprocessing)
    with pytest.raises(DeployError, match=f"export.json is not a valid export description.*{culprit}"):
        read_spec(write_export_json(tmp_path, data))
