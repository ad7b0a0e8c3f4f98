"""Checkpoints of the reference DETR's own detectron2 wrapper (d2/ in facebookresearch/detr).

The files are written here from the reference fixtures by the wrapper's layout, as its
converter and trainer name tensors (written independently of detr_d2's mapping):
- every key under ``detr.``; the backbone as ``detr.backbone.0.backbone.<detectron2 ResNet
  name>``: torchvision's ``conv1``/``bn1`` become ``stem.conv1``/``stem.conv1.norm``,
  ``layerN`` ``res{N+1}``, ``bnK`` ``convK.norm``, ``downsample.0/1`` ``shortcut``/``shortcut.norm``;
- MODEL.MASK_ON (its trainer's DETRsegm): ``detr.detr.<detector>``, ``detr.bbox_attention.*``,
  ``detr.mask_head.*``;
- trainer files also hold ``optimizer``, ``scheduler``, ``iteration``.
Loaded through MODEL.WEIGHTS' checkpointer, they give the reference fixture's outputs.
"""
import re
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from detr_d2.engine import AtomicDetectionCheckpointer, SetupError
from detr_d2.engine.frozen_detector import load_frozen_detector
from tests.helpers import REPO, chw_images, config_for_fixture, convert_with_cli, fixture_dir
from tests.modeling.test_reference_parity import assert_detections_close, detections, raw_outputs
from tests.modeling.test_segm_parity import assert_mask_logits_close, mask_predictions

TINY, SEGM = "detr_upstream_tiny", "detr_upstream_segm_tiny"
TORCHVISION_TO_DETECTRON2 = (  # applied in order to a torchvision ResNet key
    (r"^conv1\.", "stem.conv1."), (r"^bn1\.", "stem.conv1.norm."),
    (r"^layer(\d)\.", lambda m: f"res{int(m[1]) + 1}."), (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."), (r"\.downsample\.1\.", ".shortcut.norm."),
)
TRAINER_STATE = {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                 "scheduler": {"last_epoch": 1200, "base_lrs": [1e-4]}, "iteration": 1199}


def wrapper_detector_key(reference_key):
    """A reference DETR key as the wrapper's Detr.detr names it (without the outer ``detr.``)."""
    if not reference_key.startswith("backbone.0.body."):
        return reference_key
    name = reference_key[len("backbone.0.body."):]
    for pattern, replacement in TORCHVISION_TO_DETECTRON2:
        name = re.sub(pattern, replacement, name)
    return "backbone.0.backbone." + name


def wrapper_state(reference):
    """The wrapper's state dict of a reference detection or DETRsegm state dict."""
    if not any(key.startswith("detr.") for key in reference):
        return {"detr." + wrapper_detector_key(key): value for key, value in reference.items()}
    return {("detr.detr." + wrapper_detector_key(key[len("detr."):]) if key.startswith("detr.") else "detr." + key): value
            for key, value in reference.items()}


def reference_model_state(name):
    return torch.load(fixture_dir(name) / "checkpoint.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Wrapper files of both fixtures: converter layout ({"model"}) and trainer layout."""
    root = tmp_path_factory.mktemp("wrapper")
    paths = {}
    for name in (TINY, SEGM):
        state = wrapper_state(reference_model_state(name))
        paths[name] = root / f"{name}_converted.pth"
        torch.save({"model": state}, paths[name])
        paths[name, "trainer"] = root / f"{name}_model_0001199.pth"
        torch.save({"model": state, **TRAINER_STATE}, paths[name, "trainer"])
    detector = {key[len("detr."):]: value for key, value in reference_model_state(SEGM).items() if key.startswith("detr.")}
    paths["segm_detector"] = root / "segm_detector_wrapper.pth"
    torch.save({"model": wrapper_state(detector)}, paths["segm_detector"])
    return paths


def loaded_model(name, path):
    model = build_model(config_for_fixture(fixture_dir(name)))
    AtomicDetectionCheckpointer(model).load_for_inference(str(path))
    return model.eval()


def test_wrapper_keys_are_those_of_the_wrapper(files):
    keys = torch.load(files[TINY], weights_only=True)["model"].keys()
    assert "detr.backbone.0.backbone.stem.conv1.norm.running_var" in keys
    assert "detr.backbone.0.backbone.res5.0.shortcut.norm.weight" in keys
    assert "detr.transformer.decoder.norm.weight" in keys and "detr.bbox_embed.layers.2.bias" in keys
    segm_keys = torch.load(files[SEGM], weights_only=True)["model"].keys()
    assert "detr.detr.backbone.0.backbone.res2.1.conv2.norm.bias" in segm_keys
    assert "detr.bbox_attention.q_linear.weight" in segm_keys and "detr.mask_head.adapter3.bias" in segm_keys


@pytest.mark.parametrize("kind", ["converted", "trainer"])
def test_wrapper_checkpoint_gives_the_reference_outputs(files, kind, caplog):
    path = files[TINY] if kind == "converted" else files[TINY, "trainer"]
    with caplog.at_level("INFO", logger="detectron2"):
        model = loaded_model(TINY, path)
    assert "detectron2 wrapper" in caplog.text and "173 tensors" in caplog.text
    if kind == "trainer":
        assert "iteration, optimizer, scheduler entries are not restored" in caplog.text
    inputs = torch.load(fixture_dir(TINY) / "inputs.pt", weights_only=True)
    expected = torch.load(fixture_dir(TINY) / "expected.pt", weights_only=True)
    images = chw_images(inputs)
    logits, boxes = raw_outputs(model, images)
    torch.testing.assert_close(logits[-1], expected["batched"]["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes[-1], expected["batched"]["pred_boxes"], atol=1e-5, rtol=0)
    for instances, det, image in zip(detections(model, images), expected["batched"]["detections"], images):
        assert_detections_close(instances, det["scores"], det["labels"], det["boxes"], image)


@pytest.mark.parametrize("kind", ["converted", "trainer"])
def test_mask_on_wrapper_checkpoint_gives_the_reference_masks(files, kind):
    model = loaded_model(SEGM, files[SEGM] if kind == "converted" else files[SEGM, "trainer"])
    inputs = torch.load(fixture_dir(SEGM) / "inputs.pt", weights_only=True)
    expected = torch.load(fixture_dir(SEGM) / "expected.pt", weights_only=True)["batched"]
    logits, boxes, mask_logits = mask_predictions(model, chw_images(inputs))
    torch.testing.assert_close(logits[-1], expected["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes[-1], expected["pred_boxes"], atol=1e-5, rtol=0)
    assert_mask_logits_close(mask_logits, expected["pred_masks"])


def test_converter_writes_the_same_weights_as_from_the_reference(files, tmp_path, converted_reference):
    for name in (TINY, SEGM):
        from_wrapper, (from_reference, _) = tmp_path / f"{name}_w.pth", converted_reference(name)
        result = convert_with_cli(files[name, "trainer"], from_wrapper)
        assert result.returncode == 0, result.stderr
        assert "detectron2 wrapper" in result.stdout
        ours, theirs = (torch.load(p, weights_only=True)["model"] for p in (from_wrapper, from_reference))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_frozen_weights_read_a_wrapper_detector_file(files):
    model = build_model(config_for_fixture(fixture_dir(SEGM)))
    load_frozen_detector(model, str(files["segm_detector"]))
    reference = reference_model_state(SEGM)
    torch.testing.assert_close(model.transformer.decoder.norm.weight, reference["detr.transformer.decoder.norm.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.body.res4[1].conv1.norm.running_mean,
                               reference["detr.backbone.0.body.layer3.1.bn1.running_mean"], rtol=0, atol=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("mask_head.") for name in trainable)


def test_early_wrapper_converter_head_is_warned_about(files, tmp_path):
    state = dict(torch.load(files[TINY], weights_only=True)["model"])
    for key in ("detr.class_embed.weight", "detr.class_embed.bias"):  # an 80-class head whose no-object row is row 0
        state[key] = torch.cat([state[key][:1].repeat(80, *[1] * (state[key].dim() - 1)), state[key][:1]])
    source = tmp_path / "early.pth"
    torch.save({"model": state}, source)
    result = convert_with_cli(source, tmp_path / "out.pth")
    assert result.returncode == 0 and "no-object row of the class head equals the 'person' row" in result.stdout


def test_eval_only_reads_the_wrapper_checkpoint_and_logs_its_layout(files, tmp_path):
    cfg = config_for_fixture(fixture_dir(TINY))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.dump())
    result = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(config_file),
                             "--eval-only", "MODEL.WEIGHTS", str(files[TINY, "trainer"]), "OUTPUT_DIR",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "checkpoint layout of the reference DETR's detectron2 wrapper (d2/)" in output


def test_checkpoint_of_no_known_layout_is_one_error_naming_layouts_and_closest(files, tmp_path):
    """A wrapper-like file whose backbone has other names: no layout has all its keys."""
    state = {key.replace("detr.backbone.0.backbone.", "detr.backbone.body."): value
             for key, value in torch.load(files[TINY], weights_only=True)["model"].items()}
    path = tmp_path / "renamed.pth"
    torch.save({"model": state}, path)
    model = build_model(config_for_fixture(fixture_dir(TINY)))
    with pytest.raises(SetupError) as error:
        AtomicDetectionCheckpointer(model).load(str(path))
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for layout in ("wrapper", "transformers", "reference", "detr_d2"):
        assert f"{layout}: " in message
    assert "closest: wrapper (" in message and "detr.backbone.body." in message
    assert "config" not in message.lower()
    result = convert_with_cli(path, tmp_path / "out.pth")
    assert result.returncode == 2 and "closest: wrapper" in result.stderr


def wrapper_converter_key(reference_key):
    """What the wrapper's converter makes of any reference key: in a key holding "backbone",
    ``backbone.0.body.`` is dropped, ``stem.`` put before keys without "layer", layerN ->
    res{N+1}, bnK -> convK.norm, downsample.0/1 -> shortcut(.norm), then ``backbone.0.backbone.``
    put before; every key then gets ``detr.``. (On a DETRsegm checkpoint, whose detector keys
    start with ``detr.``, this nests the backbone names.)"""
    key = reference_key
    if "backbone" in key:
        key = key.replace("backbone.0.body.", "")
        key = key if "layer" in key else "stem." + key
        for pattern, replacement in TORCHVISION_TO_DETECTRON2[2:]:
            key = re.sub(pattern.lstrip("^"), replacement, key)
        key = "backbone.0.backbone." + key
    return "detr." + key


def test_wrapper_converter_output_of_a_segmentation_checkpoint_is_read(tmp_path, converted_reference):
    reference = reference_model_state(SEGM)
    source = tmp_path / "segm_wrapper_converter.pth"
    torch.save({"model": {wrapper_converter_key(key): value for key, value in reference.items()}}, source)
    assert any(".backbone.0.backbone.stem.detr.conv1." in key for key in torch.load(source, weights_only=True)["model"])
    ours, (theirs, _) = tmp_path / "w.pth", converted_reference(SEGM)
    assert convert_with_cli(source, ours).returncode == 0
    ours, theirs = (torch.load(p, weights_only=True)["model"] for p in (ours, theirs))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
