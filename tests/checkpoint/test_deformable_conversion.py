"""tools/convert_detr_checkpoint.py on reference Deformable DETR checkpoints: OUT.pth and
the OUT.yaml that builds its model, the COCO head rule, training arguments, MODEL.WEIGHTS
reading the reference file directly, and one-line errors for bad inputs."""
import argparse
import ast

import pytest
import torch
import yaml
from detectron2.modeling import build_model

from detr_d2.checkpoint.convert import COCO_CATEGORY_IDS, ConversionError
from detr_d2.checkpoint.layouts import DEFORMABLE, REFERENCE, detect_layout, read_layout
from detr_d2.engine import AtomicDetectionCheckpointer, build_config
from tests.helpers import REPO, convert_with_cli, fixture_dir, run_concurrently

TINY = "deformable_upstream_tiny"
TWO_STAGE = "deformable_upstream_two_stage_coco"
HEAD_ALIASES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")


def reference_state_dict(name):
    return torch.load(fixture_dir(name) / "checkpoint.pth", weights_only=True)["model"]


def reference_configuration(name):
    """The fixture README's reference configuration block as {argument: value}."""
    block = (fixture_dir(name) / "README.md").read_text().split("```")[1]
    pairs = (line.split(" = ", 1) for line in block.strip().splitlines())
    return {key: ast.literal_eval(value) for key, value in pairs}


def converted_config(output, *opts):
    return build_config(str(output.with_suffix(".yaml")), ["MODEL.DEVICE", "cpu", *opts],
                        all_datasets_registered=False)


@pytest.fixture(scope="module")
def converted(converted_reference):
    """{fixture: (OUT.pth path, converter stdout)}, each fixture converted once per session."""
    return {name: (converted_reference(name)[0], converted_reference(name)[1].stdout) for name in (TINY, TWO_STAGE)}


def shapes(state_dict):
    return {key: tuple(value.shape) for key, value in state_dict.items()}


@pytest.mark.parametrize("name", [TINY, TWO_STAGE])
def test_out_yaml_builds_a_model_with_exactly_the_converted_tensors(converted, name):
    output, _ = converted[name]
    text = output.with_suffix(".yaml").read_text()
    assert yaml.safe_load(text)["_BASE_"] == str(REPO / "configs" / "Base-DeformableDETR.yaml")
    cfg = converted_config(output)
    assert cfg.MODEL.WEIGHTS == str(output)
    converted_tensors = torch.load(output, weights_only=True)["model"]
    assert shapes(build_model(cfg).state_dict()) == shapes(converted_tensors)


@pytest.mark.parametrize("name", [TINY, TWO_STAGE])
def test_every_size_and_flavour_is_read_from_the_tensors(converted, name):
    output, stdout = converted[name]
    reference = reference_configuration(name)
    cfg = converted_config(output)
    detr, multi_scale = cfg.MODEL.DETR, cfg.MODEL.MULTI_SCALE
    found = {
        "backbone": f"resnet{cfg.MODEL.RESNETS.DEPTH}", "hidden_dim": detr.HIDDEN_DIM, "nheads": detr.NHEADS,
        "enc_layers": detr.ENC_LAYERS, "dec_layers": detr.DEC_LAYERS, "dim_feedforward": detr.DIM_FEEDFORWARD,
        "num_feature_levels": multi_scale.NUM_FEATURE_LEVELS, "enc_n_points": multi_scale.ENC_N_POINTS,
        "dec_n_points": multi_scale.DEC_N_POINTS, "with_box_refine": multi_scale.WITH_BOX_REFINE,
        "two_stage": multi_scale.TWO_STAGE, "dilation": cfg.MODEL.RESNETS.RES5_DILATION == 2,
    }
    assert found == {key: reference[key] for key in found}
    assert cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 64 and multi_scale.IN_FEATURES == ["res3", "res4", "res5"]
    assert "8 attention heads assumed" in stdout
    if reference["two_stage"]:  # no tensor holds the proposal count: the reference's default, said so
        assert detr.NUM_OBJECT_QUERIES == 300 and "300 (the reference's default) assumed" in stdout
    else:
        assert detr.NUM_OBJECT_QUERIES == reference["num_queries"]
    coco = reference["dataset_file"] == "coco"
    assert detr.NUM_CLASSES == (80 if coco else 20)
    assert (cfg.DATASETS.TEST == ("coco_2017_val",)) if coco else (cfg.DATASETS.TEST == ())


def test_coco_heads_keep_the_category_rows_and_the_proposal_head_its_output_0(converted):
    output, stdout = converted[TWO_STAGE]
    reference = reference_state_dict(TWO_STAGE)
    ours = torch.load(output, weights_only=True)["model"]
    decoder_layers = reference_configuration(TWO_STAGE)["dec_layers"]
    for index in range(decoder_layers):
        for kind in ("weight", "bias"):
            key = f"class_embed.{index}.{kind}"
            assert torch.equal(ours[key], reference[key][list(COCO_CATEGORY_IDS)])
    proposal_rows = [0] + list(COCO_CATEGORY_IDS[1:])
    for kind in ("weight", "bias"):
        key = f"class_embed.{decoder_layers}.{kind}"
        assert torch.equal(ours[key], reference[key][proposal_rows])
    assert "91 outputs -> 80" in stdout
    left_out = [key for key in reference if key.startswith(HEAD_ALIASES) or key.endswith("num_batches_tracked")]
    assert left_out and not any(key in ours for key in left_out)
    assert len(ours) == len(reference) - len(left_out)


def test_model_weights_reads_the_reference_checkpoint_directly(converted):
    """MODEL.WEIGHTS = the reference file gives the tensors the converter writes."""
    output, _ = converted[TWO_STAGE]
    model = build_model(converted_config(output))
    AtomicDetectionCheckpointer(model).load_for_inference(str(fixture_dir(TWO_STAGE) / "checkpoint.pth"))
    expected = torch.load(output, weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_layout_is_detected_by_its_keys():
    assert detect_layout(reference_state_dict(TINY)) is DEFORMABLE
    assert detect_layout(torch.load(fixture_dir("detr_upstream_tiny") / "checkpoint.pth",
                                    weights_only=True)["model"]) is REFERENCE


def test_training_script_arguments_give_what_no_tensor_holds(tmp_path):
    """Heads (and so points), proposals, dilation, dropout and loss weights from "args"
    (dilation False: torchvision's ResNet-18 has none)."""
    source, output = tmp_path / "checkpoint0049.pth", tmp_path / "out.pth"
    arguments = dict(reference_configuration(TWO_STAGE), nheads=4, enc_n_points=8, dec_n_points=8, num_queries=30,
                     cls_loss_coef=3)
    torch.save({"model": reference_state_dict(TWO_STAGE), "epoch": 49, "args": argparse.Namespace(**arguments)},
               source)
    result = convert_with_cli(source, output)
    assert result.returncode == 0, result.stderr
    assert "assumed" not in result.stdout
    cfg = converted_config(output)
    detr, multi_scale = cfg.MODEL.DETR, cfg.MODEL.MULTI_SCALE
    assert (detr.NHEADS, multi_scale.ENC_N_POINTS, multi_scale.DEC_N_POINTS) == (4, 8, 8)
    assert (detr.NUM_OBJECT_QUERIES, cfg.MODEL.RESNETS.RES5_DILATION, detr.DROPOUT) == (30, 1, 0.0)
    assert (detr.CLASS_WEIGHT, detr.L1_WEIGHT, multi_scale.FOCAL_ALPHA) == (3.0, 5.0, 0.25)
    assert shapes(build_model(cfg).state_dict()) == shapes(torch.load(output, weights_only=True)["model"])


# ---------------------------------------------------------------- bad inputs
def assert_one_line_error(run, *culprits):
    """Exit 2, no traceback, one error line naming every culprit, nothing written."""
    assert run.returncode == 2, run.output[-3000:]
    assert "Traceback" not in run.output
    lines = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(culprit in lines[0] for culprit in culprits), run.stderr[-3000:]


def test_truncated_checkpoints_are_one_line_errors_naming_file_and_key(tmp_path):
    detr = {k: v for k, v in torch.load(fixture_dir("detr_upstream_tiny") / "checkpoint.pth",
                                        weights_only=True)["model"].items() if not k.startswith("class_embed.")}
    deformable = {k: v for k, v in reference_state_dict(TINY).items()
                  if not k.startswith("transformer.encoder.layers.1.linear2.")}
    commands, outputs = [], []
    for name, state in (("detr", detr), ("deformable", deformable)):
        source, output = tmp_path / f"{name}.pth", tmp_path / f"{name}_out.pth"
        torch.save({"model": state}, source)
        commands.append([REPO / "tools" / "convert_detr_checkpoint.py", "--source", source, "--output", output])
        outputs.append(output)
    detr_run, deformable_run = run_concurrently(commands, tmp_path)
    assert_one_line_error(detr_run, str(tmp_path / "detr.pth"), "class_embed.weight")
    assert_one_line_error(deformable_run, str(tmp_path / "deformable.pth"), "transformer.encoder.layers.1.linear2")
    assert not any(output.exists() or output.with_suffix(".yaml").exists() for output in outputs)


def test_layers_of_differing_shapes_are_named():
    state = dict(reference_state_dict(TINY))
    key = "transformer.decoder.layers.1.cross_attn.sampling_offsets.weight"
    state[key] = state[key][:-8]
    with pytest.raises(ConversionError, match=rf"^odd\.pth: {key} has shape \[248, 64\] where "
                                              r"transformer\.decoder\.layers\.0\.[\w.]+ has \[256, 64\]"):
        read_layout(state, "odd.pth")


def test_keys_of_no_deformable_model_are_named():
    state = dict(reference_state_dict(TINY), **{"transformer.decoder.query_scale.weight": torch.zeros(64, 64)})
    with pytest.raises(ConversionError, match=r"^odd\.pth: keys the reference Deformable DETR does not have: "
                                              r"transformer\.decoder\.query_scale\.weight$"):
        read_layout(state, "odd.pth")


def shared_head_two_stage_state():
    """The two-stage fixture as the reference's --two_stage without --with_box_refine has it:
    one class and one box head for every decoder layer and the proposals, no box alias."""
    state = {k: v for k, v in reference_state_dict(TWO_STAGE).items()
             if not k.startswith("transformer.decoder.bbox_embed.")}
    for key in list(state):
        for head in ("class_embed.", "bbox_embed.", "transformer.decoder.class_embed."):
            if key.startswith(head):
                state[key] = state[head + "0." + key[len(head):].split(".", 1)[1]]
    return state


def test_two_stage_without_refinement_remaps_no_shared_head_but_keeps_it():
    state = shared_head_two_stage_state()
    with pytest.raises(ConversionError, match=r"^shared\.pth: a two-stage model without box refinement .* "
                                              r"--keep-classes"):
        read_layout(state, "shared.pth")
    reading = read_layout(state, "shared.pth", keep_classes=True)
    assert reading.state_dict["class_embed.0.weight"].shape[0] == 91
    options = dict(reading.config()[0])
    assert (options["MODEL.MULTI_SCALE.TWO_STAGE"], options["MODEL.MULTI_SCALE.WITH_BOX_REFINE"]) == (True, False)


def test_per_layer_heads_that_differ_without_refinement_keys_are_named():
    state = shared_head_two_stage_state()
    state["bbox_embed.1.layers.0.bias"] = state["bbox_embed.1.layers.0.bias"] + 1
    with pytest.raises(ConversionError, match=r"^odd\.pth: bbox_embed\.1\.layers\.0\.bias differs from "
                                              r"bbox_embed\.0\.layers\.0\.bias"):
        read_layout(state, "odd.pth", keep_classes=True)
