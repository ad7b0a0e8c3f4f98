"""Hugging Face transformers DETR models <-> detr_d2 through tools/convert_detr_checkpoint.py.

Tiny transformers models with random weights (and random frozen batch-norm statistics) of
both backbone flavours (a timm resnet18; transformers' own ResNetBackbone, here a narrow
ResNet-50 layout) are saved with ``save_pretrained``, converted by the CLI (its command
line in subprocesses for the four main cases, its ``main`` in the test process for the
variants), and run by detr_d2 from the written config: logits, boxes (and mask logits) equal transformers' own
within 1e-4 on the same normalised, padded pixel tensor and pixel mask. The way back
(``--to transformers``) is loaded by transformers, predicts the same, and converts back to
the identical detr_d2 weights.
"""
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import ImageList

from detr_d2 import add_detr_config
from detr_d2.checkpoint.convert import COCO_CATEGORY_IDS, COCO_HEAD_ROWS
from detr_d2.engine import AtomicDetectionCheckpointer, merge_config
from detr_d2.engine.build import build_model
from tests.helpers import REPO, config_for_fixture, fixture_dir, run_concurrently
from tests.modeling.test_segm_parity import assert_mask_logits_close

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("safetensors")

SIZES = [(96, 128), (80, 100)]  # the second image padded at the bottom/right
LABELS = {0: "cat", 1: "dog", 2: "bird"}


def coco_labels():
    """id2label as transformers' COCO ports have it: ids 0..90, "N/A" where COCO has no class."""
    return {i: (f"coco{i}" if i in COCO_CATEGORY_IDS else "N/A") for i in range(91)}


def randomise_frozen_batch_norms(model):
    """Frozen BN statistics and affine values away from identity, so that their mapping counts."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("running_var", ".weight")):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
            elif name.endswith(("running_mean", ".bias")):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


def hf_model(backbone, segmentation, labels=LABELS, position_embedding="sine"):
    """A tiny transformers DETR in eval mode (random weights, seeded)."""
    common = dict(position_embedding_type=position_embedding, d_model=128 if segmentation else 64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=96,
                  decoder_ffn_dim=96, num_queries=7, num_labels=len(labels), id2label=labels, dropout=0.0,
                  use_pretrained_backbone=False)
    if backbone == "timm":
        config = transformers.DetrConfig(use_timm_backbone=True, backbone="resnet18", **common)
    else:
        resnet = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[3, 4, 6, 3],
                                           layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"])
        config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=resnet, **common)
    torch.manual_seed(0)
    cls = transformers.DetrForSegmentation if segmentation else transformers.DetrForObjectDetection
    model = cls(config).eval()
    randomise_frozen_batch_norms(model)
    return model


def padded_inputs():
    """(normalised pixel tensor [2, 3, 96, 128] zero on padding, pixel mask [2, 96, 128] 1 on pixels)."""
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, *SIZES[0])
    mask = torch.zeros(2, *SIZES[0], dtype=torch.long)
    for index, (height, width) in enumerate(SIZES):
        mask[index, :height, :width] = 1
    return pixels * mask[:, None], mask


def detr_d2_model(config_file, weights):
    cfg = merge_config(add_detr_config(get_cfg()), str(config_file), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    AtomicDetectionCheckpointer(model).load_for_inference(str(weights))
    return model.eval()


def detr_d2_outputs(model, pixels):
    """(logits, boxes[, mask logits]) of the last decoder layer for the padded batch."""
    images = ImageList(pixels, SIZES)
    with torch.no_grad():
        if model.mask_head is not None:
            logits, boxes, masks = model.predict_with_masks(images)
            return logits[-1], boxes[-1], masks
        logits, boxes = model.predict(images)
    return logits[-1], boxes[-1]


def hf_outputs(model, pixels, mask):
    with torch.no_grad():
        out = model(pixel_values=pixels, pixel_mask=mask)
    return (out.logits, out.pred_boxes) + ((out.pred_masks,) if hasattr(out, "pred_masks") else ())


def assert_outputs_close(ours, theirs, logit_columns=None, scaled_mask_inputs=False):
    """Logits, boxes and mask logits within 1e-4; ``scaled_mask_inputs``: the segm fixture's
    mask head inputs are scaled by 3000, which magnifies float32 rounding (see
    tests/modeling/test_segm_parity.py): its tolerance for the mask logits."""
    if logit_columns is not None:
        theirs = (theirs[0][..., logit_columns], *theirs[1:])
    for name, a, b in zip(("logits", "boxes", "mask logits"), ours, theirs):
        if name == "mask logits" and scaled_mask_inputs:
            assert_mask_logits_close(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=name)


CONVERTER = REPO / "tools" / "convert_detr_checkpoint.py"


@pytest.fixture(scope="module")
def converter_tool():
    """tools/convert_detr_checkpoint.py as a module (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("convert_detr_checkpoint_tool", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_cli(converter_tool, capsys):
    """``run_cli(*args)``: the stdout of ``tools/convert_detr_checkpoint.py ARGS`` run in this
    process by the tool's ``main`` (what its command line runs), whose exit status is
    asserted to be 0. The command line itself runs in subprocesses in ``converted``,
    test_export_refuses_what_transformers_cannot_hold and tests/checkpoint/test_converter.py."""
    def run(*args):
        capsys.readouterr()
        status = converter_tool.main([str(arg) for arg in args])
        output = capsys.readouterr()
        assert status == 0, output.out + output.err
        return output.out
    return run


CASES = {  # name: (backbone flavour, segmentation, labels)
    "timm_detection_coco": ("timm", False, None),
    "resnet_detection": ("transformers", False, LABELS),
    "timm_segmentation": ("timm", True, LABELS),
    "resnet_segmentation": ("transformers", True, LABELS),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (transformers model, its folder, converted .pth, converter stdout): each case
    saved, then all converted at once."""
    root = tmp_path_factory.mktemp("hf")
    models = {name: hf_model(backbone, segmentation, labels or coco_labels())
              for name, (backbone, segmentation, labels) in CASES.items()}
    for name, model in models.items():
        model.save_pretrained(root / name)
    runs = run_concurrently([[CONVERTER, "--source", root / name, "--output", root / f"{name}.pth"] for name in CASES],
                            REPO / "datasets")
    for run in runs:
        assert run.returncode == 0, run.output[-3000:]
    return {name: (models[name], root / name, root / f"{name}.pth", run.stdout) for name, run in zip(CASES, runs)}


@pytest.mark.parametrize("name", list(CASES))
def test_converted_transformers_model_predicts_what_transformers_does(converted, name):
    hf, _, output, stdout = converted[name]
    assert "Hugging Face transformers DETR" in stdout
    kind = "DetrForSegmentation" if CASES[name][1] else "DetrForObjectDetection"
    flavour = "timm ResNet" if CASES[name][0] == "timm" else "transformers ResNetBackbone"
    assert f"{kind}, {flavour} backbone" in stdout
    model = detr_d2_model(output.with_suffix(".yaml"), output)
    pixels, mask = padded_inputs()
    coco = CASES[name][2] is None
    assert_outputs_close(detr_d2_outputs(model, pixels), hf_outputs(hf, pixels, mask),
                         list(COCO_HEAD_ROWS) if coco else None)


def test_class_names_of_id2label_are_written_beside_the_weights(converted):
    metadata = json.loads(converted["resnet_detection"][2].with_suffix(".metadata.json").read_text())
    assert metadata["thing_classes"] == ["cat", "dog", "bird"]
    coco = json.loads(converted["timm_detection_coco"][2].with_suffix(".metadata.json").read_text())
    assert coco["thing_classes"] == [f"coco{i}" for i in COCO_CATEGORY_IDS]
    assert coco["thing_dataset_id_to_contiguous_id"]["90"] == 79
    assert "92 outputs -> 80 detectron2 classes" in converted["timm_detection_coco"][3]


def test_weights_file_alone_and_transformers_5_module_names(converted, tmp_path, run_cli):
    """model.safetensors without config.json; a pytorch_model.bin of the model's own state_dict()."""
    hf, folder, reference_output, _ = converted["resnet_detection"]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "model.safetensors", alone / "model.safetensors")
    stdout = run_cli("--source", alone / "model.safetensors", "--output", tmp_path / "alone.pth")
    assert "no config.json: 8 attention heads" in stdout
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    torch.save(hf.state_dict(), bin_folder / "pytorch_model.bin")
    shutil.copy(folder / "config.json", bin_folder / "config.json")
    run_cli("--source", bin_folder, "--output", tmp_path / "bin.pth")
    expected = torch.load(reference_output, weights_only=True)["model"]
    for path in (tmp_path / "alone.pth", tmp_path / "bin.pth"):
        state = torch.load(path, weights_only=True)["model"]
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def export_and_back(run_cli, config_file, weights, folder, back, *extra):
    stdout = run_cli("--to", "transformers", "--source", weights, "--config-file", config_file, "--output", folder,
                     *extra)
    run_cli("--source", folder, "--output", back)
    ours = torch.load(weights, weights_only=True)["model"]
    again = torch.load(back, weights_only=True)["model"]
    assert again.keys() == ours.keys()
    assert all(torch.equal(again[key], ours[key]) for key in ours)
    return stdout


@pytest.mark.parametrize("name", ["resnet_detection", "timm_segmentation"])
def test_round_trip_of_converted_models_is_exact(converted, name, tmp_path, run_cli):
    _, _, output, _ = converted[name]
    export_and_back(run_cli, output.with_suffix(".yaml"), output, tmp_path / "hf", tmp_path / "back.pth")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["id2label"] == {"0": "cat", "1": "dog", "2": "bird"}


@pytest.mark.parametrize("fixture, backbone", [("detr_upstream_tiny", "timm"), ("detr_upstream_tiny", "transformers"),
                                               ("detr_upstream_segm_tiny", "auto")])
def test_detr_d2_model_exported_to_transformers_predicts_the_same(fixture, backbone, tmp_path, converted_reference,
                                                                  run_cli):
    """A detr_d2 checkpoint (the reference fixture, converted) and its config -> a transformers
    folder that transformers loads and that predicts what detr_d2 does; back exactly."""
    path = fixture_dir(fixture)
    (weights, _), config_file = converted_reference(fixture), tmp_path / "config.yaml"
    cfg = config_for_fixture(path)
    config_file.write_text(cfg.dump())
    stdout = export_and_back(run_cli, config_file, weights, tmp_path / "hf", tmp_path / "back.pth",
                             "--backbone-format", backbone)
    assert ("timm ResNet" if backbone != "transformers" else "transformers ResNet") in stdout
    cls = transformers.DetrForSegmentation if cfg.MODEL.MASK_ON else transformers.DetrForObjectDetection
    hf = cls.from_pretrained(tmp_path / "hf").eval()
    pixels, mask = padded_inputs()
    assert_outputs_close(detr_d2_outputs(detr_d2_model(config_file, weights), pixels), hf_outputs(hf, pixels, mask),
                         scaled_mask_inputs=bool(cfg.MODEL.MASK_ON))


def test_export_refuses_what_transformers_cannot_hold(tmp_path, converted_reference):
    path = fixture_dir("detr_upstream_tiny")
    (weights, _), config_file = converted_reference("detr_upstream_tiny"), tmp_path / "config.yaml"
    cfg = config_for_fixture(path)
    cfg.MODEL.DETR.PRE_NORM = True
    config_file.write_text(cfg.dump())
    result = subprocess.run([sys.executable, str(REPO / "tools" / "convert_detr_checkpoint.py"), "--to", "transformers",
                             "--source", str(weights), "--config-file", str(config_file), "--output",
                             str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "pre-norm" in result.stderr and not (tmp_path / "hf").exists()


def test_demo_names_detections_by_id2label(converted, tmp_path):
    """The written config has no dataset: tools/demo.py takes the names from OUT.metadata.json."""
    import numpy as np
    from PIL import Image

    _, _, output, _ = converted["resnet_detection"]
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(image)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--config-file",
                             str(output.with_suffix(".yaml")), "--input", str(image), "--output", str(tmp_path / "out"),
                             "--confidence-threshold", "0", "--opts", "MODEL.DEVICE", "cpu"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(records) == 7 and {r["category_name"] for r in records} <= set(LABELS.values())
    assert all(LABELS[r["category_id"]] == r["category_name"] for r in records)


def test_evaluation_of_a_set_without_class_names_takes_them_from_the_weights(converted, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detr_d2.evaluation import detection_evaluator

    _, _, output, _ = converted["resnet_detection"]
    cfg = merge_config(add_detr_config(get_cfg()), str(output.with_suffix(".yaml")), ["MODEL.DEVICE", "cpu"])
    for name, weights in (("hf_unnamed_with_names_beside", str(output)), ("hf_unnamed_without", "")):
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(evaluator_type="coco")
        cfg.MODEL.WEIGHTS = weights
        if weights:
            detection_evaluator(cfg, name, str(tmp_path / name))
            assert MetadataCatalog.get(name).thing_classes == ["cat", "dog", "bird"]
        else:  # without the names file, detectron2's COCOEvaluator cannot describe the set
            with pytest.raises(AttributeError, match="thing_classes"):
                detection_evaluator(cfg, name, str(tmp_path / name))


def test_dilated_timm_resnet50_is_read_as_a_dc5_model(tmp_path, run_cli):
    """config.json's dilation (the Hub's detr-resnet-50-dc5): RES5_DILATION 2 with the first
    res5 block undilated, as timm and torchvision build it."""
    config = transformers.DetrConfig(use_timm_backbone=True, backbone="resnet50", dilation=True,
                                     use_pretrained_backbone=False, d_model=64, encoder_layers=1, decoder_layers=1,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, num_labels=2, dropout=0.0)
    torch.manual_seed(0)
    hf = transformers.DetrForObjectDetection(config).eval()
    randomise_frozen_batch_norms(hf)
    hf.save_pretrained(tmp_path / "dc5")
    run_cli("--source", tmp_path / "dc5", "--output", tmp_path / "dc5.pth")
    model = detr_d2_model(tmp_path / "dc5.yaml", tmp_path / "dc5.pth")
    assert model.backbone.body.res5[1].conv2.dilation == (2, 2) and model.backbone.body.res5[0].conv2.dilation == (1, 1)
    pixels, mask = padded_inputs()
    assert_outputs_close(detr_d2_outputs(model, pixels), hf_outputs(hf, pixels, mask))


def test_model_weights_may_name_a_transformers_safetensors_file(converted, caplog):
    """MODEL.WEIGHTS = a transformers model.safetensors: read with the safetensors library,
    its layout detected and logged, the same tensors as the converter writes."""
    _, folder, output, _ = converted["timm_segmentation"]
    cfg = merge_config(add_detr_config(get_cfg()), str(output.with_suffix(".yaml")), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    with caplog.at_level("INFO", logger="detectron2"):
        AtomicDetectionCheckpointer(model).load_for_inference(str(folder / "model.safetensors"))
    assert "checkpoint layout of Hugging Face transformers DETR" in caplog.text
    expected = torch.load(output, weights_only=True)["model"]
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in expected.items())


def test_learned_position_embedding_is_read(tmp_path, run_cli):
    hf = hf_model("timm", False, position_embedding="learned")
    hf.save_pretrained(tmp_path / "learned")
    run_cli("--source", tmp_path / "learned", "--output", tmp_path / "learned.pth")
    model = detr_d2_model(tmp_path / "learned.yaml", tmp_path / "learned.pth")
    assert model.position_embedding.row_embed.weight.shape == (50, 32)
    pixels, mask = padded_inputs()
    assert_outputs_close(detr_d2_outputs(model, pixels), hf_outputs(hf, pixels, mask))
