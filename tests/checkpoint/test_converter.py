"""tools/convert_detr_checkpoint.py on the reference fixtures and on bad inputs."""
import argparse

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from detr_d2.checkpoint.convert import COCO_CATEGORY_IDS, COCO_HEAD_ROWS, rename_key, resnet_depth
from tests.helpers import config_for_fixture, convert_with_cli, fixture_dir


def reference_state_dict(name):
    return torch.load(fixture_dir(name) / "checkpoint.pth", weights_only=True)["model"]


def load_report(model, path):
    """(missing, unexpected) keys when loading a converted file strictly."""
    state_dict = torch.load(path, weights_only=True)["model"]
    result = model.load_state_dict(state_dict, strict=False)
    return sorted(result.missing_keys), sorted(result.unexpected_keys)


@pytest.mark.parametrize("name", ["detr_upstream_tiny", "detr_upstream_r50dc5_coco92"])
def test_converted_fixture_loads_with_no_missing_or_unexpected_keys(name, converted_reference):
    output, result = converted_reference(name)
    assert result.returncode == 0, result.stderr
    model = build_model(config_for_fixture(fixture_dir(name)))
    assert load_report(model, output) == ([], [])


def test_coco_head_is_remapped_to_80_classes_plus_no_object(converted_reference):
    reference = reference_state_dict("detr_upstream_r50dc5_coco92")
    output, _ = converted_reference("detr_upstream_r50dc5_coco92")
    converted = torch.load(output, weights_only=True)["model"]
    assert converted["class_embed.weight"].shape[0] == 81
    assert len(COCO_CATEGORY_IDS) == 80 and COCO_HEAD_ROWS[-1] == 91
    person, toothbrush = 0, 79
    torch.testing.assert_close(converted["class_embed.weight"][person], reference["class_embed.weight"][1])
    torch.testing.assert_close(converted["class_embed.bias"][toothbrush], reference["class_embed.bias"][90])
    torch.testing.assert_close(converted["class_embed.bias"][80], reference["class_embed.bias"][91])


def test_drop_class_head_leaves_only_the_head_missing(converted_reference):
    name = "detr_upstream_tiny"
    output, result = converted_reference(name, "--drop-class-head")
    assert result.returncode == 0 and "dropped" in result.stdout
    model = build_model(config_for_fixture(fixture_dir(name)))
    assert load_report(model, output) == (["class_embed.bias", "class_embed.weight"], [])


def test_training_script_checkpoint_with_args_is_accepted(tmp_path):
    source = tmp_path / "checkpoint0099.pth"
    model_state = reference_state_dict("detr_upstream_tiny")
    torch.save({"model": model_state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "lr_scheduler": {"step_size": 200, "last_epoch": 100}, "epoch": 99,
                "args": argparse.Namespace(lr=1e-4, backbone="resnet18", dilation=False)}, source)
    output = tmp_path / "out.pth"
    result = convert_with_cli(source, output)
    assert result.returncode == 0, result.stderr
    assert len(torch.load(output, weights_only=True)["model"]) == len(model_state)


def test_resnet_key_renaming_and_depth_detection():
    assert rename_key("backbone.0.body.layer4.0.downsample.1.running_var") == "backbone.body.res5.0.shortcut.norm.running_var"
    assert rename_key("backbone.0.body.bn1.weight") == "backbone.body.stem.conv1.norm.weight"
    assert rename_key("backbone.0.body.layer1.2.conv3.weight") == "backbone.body.res2.2.conv3.weight"
    assert rename_key("backbone.1.row_embed.weight") == "position_embedding.row_embed.weight"
    assert rename_key("transformer.decoder.norm.bias") == "transformer.decoder.norm.bias"
    assert rename_key("fc.weight") is None
    keys = [f"layer{s}.{b}.conv3.weight" for s, n in zip(range(1, 5), (3, 4, 23, 3)) for b in range(n)]
    assert resnet_depth(keys) == 101
    assert resnet_depth(keys[:-1]) is None


@pytest.mark.parametrize("content, message", [
    ({"state_dict": {"a": torch.zeros(1)}}, "expected a dict with a 'model'"),
    ({"model": {"conv.weight": torch.zeros(1)}}, "fit none of the checkpoint layouts"),
])
def test_not_a_detr_checkpoint_is_a_clear_error(tmp_path, content, message):
    source, output = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save(content, source)
    result = convert_with_cli(source, output)
    assert result.returncode == 2 and message in result.stderr and str(source) in result.stderr
    assert not output.exists()


def test_unknown_keys_are_named(tmp_path):
    state = dict(reference_state_dict("detr_upstream_tiny"))
    state["backbone.0.body.fc.weight"] = torch.zeros(2)
    state["extra_head.weight"] = torch.zeros(2)
    source, output = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save({"model": state}, source)
    result = convert_with_cli(source, output)
    assert result.returncode == 2
    assert "backbone.0.body.fc.weight" in result.stderr and "extra_head.weight" in result.stderr
    assert not output.exists()


def test_unknown_backbone_is_a_clear_error(tmp_path):
    state = {k: v for k, v in reference_state_dict("detr_upstream_tiny").items() if ".layer4.1." not in k}
    source, output = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save({"model": state}, source)
    result = convert_with_cli(source, output)
    assert result.returncode == 2 and "not a ResNet" in result.stderr and not output.exists()


def test_truncated_file_is_a_clear_error_and_output_untouched(tmp_path):
    source, output = tmp_path / "in.pth", tmp_path / "out.pth"
    source.write_bytes((fixture_dir("detr_upstream_tiny") / "checkpoint.pth").read_bytes()[:4096])
    output.write_bytes(b"previous")
    result = convert_with_cli(source, output)
    assert result.returncode == 2 and str(source) in result.stderr
    assert output.read_bytes() == b"previous"


def test_converted_weights_load_through_detection_checkpointer(converted_reference):
    name = "detr_upstream_tiny"
    output, _ = converted_reference(name)
    model = build_model(config_for_fixture(fixture_dir(name)))
    DetectionCheckpointer(model).load(str(output))
    reference = reference_state_dict(name)
    torch.testing.assert_close(model.backbone.body.res3[1].conv2.weight, reference["backbone.0.body.layer2.1.conv2.weight"])
    torch.testing.assert_close(model.backbone.body.stem.conv1.norm.running_mean, reference["backbone.0.body.bn1.running_mean"])
