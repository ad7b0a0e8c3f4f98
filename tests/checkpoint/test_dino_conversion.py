"""tools/convert_detr_checkpoint.py on reference DINO checkpoints: OUT.pth and the OUT.yaml
that builds its ``Dino`` (every size read from the tensors), the layout's detection by its
keys, the 91-output COCO head rule (decoder heads, the query selection's head, the
denoising label embeddings), and one-line errors for bad inputs."""
import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from detr_d2 import add_detr_config
from detr_d2.checkpoint.convert import COCO_CATEGORY_IDS, ConversionError
from detr_d2.checkpoint.layouts import DEFORMABLE, DINO, detect_layout, read_layout
from detr_d2.engine import AtomicDetectionCheckpointer, merge_config
from detr_d2.modeling.multi_scale.denoising import make_denoising_queries
from tests.checkpoint.test_deformable_conversion import (assert_one_line_error, converted_config,
                                                         reference_configuration, reference_state_dict, shapes)
from tests.helpers import REPO, chw_images, fixture_dir, run_concurrently
from tests.modeling.test_dino_parity import NAME, REFERENCE_OPTS, converted_dino_fixture

HEAD_ALIASES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")
CLASS_SIZED = ("class_embed.", "transformer.enc_out_class_embed.", "label_enc.")


@pytest.fixture(scope="module")
def converted(converted_reference):
    """(OUT.pth path, converter stdout) of the fixture, converted once per session."""
    output, result = converted_reference(NAME, *REFERENCE_OPTS)
    return output, result.stdout


def test_out_yaml_builds_the_model_that_loads_out_pth_without_missing_or_unexpected_keys(converted):
    output, _ = converted
    assert yaml.safe_load(output.with_suffix(".yaml").read_text())["_BASE_"] == str(REPO / "configs" / "Base-DINO.yaml")
    cfg = converted_config(output)
    assert cfg.MODEL.META_ARCHITECTURE == "Dino" and cfg.MODEL.WEIGHTS == str(output)
    model = build_model(cfg)
    tensors = torch.load(output, weights_only=True)["model"]
    incompatible = model.load_state_dict(tensors, strict=False)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert shapes(model.state_dict()) == shapes(tensors)


def test_every_size_is_read_from_the_tensors(converted):
    output, stdout = converted
    reference = reference_configuration(NAME)
    cfg = converted_config(output)
    detr, multi_scale, dino = cfg.MODEL.DETR, cfg.MODEL.MULTI_SCALE, cfg.MODEL.DINO
    found = {
        "backbone": f"resnet{cfg.MODEL.RESNETS.DEPTH}", "hidden_dim": detr.HIDDEN_DIM, "nheads": detr.NHEADS,
        "enc_layers": detr.ENC_LAYERS, "dec_layers": detr.DEC_LAYERS, "dim_feedforward": detr.DIM_FEEDFORWARD,
        "num_queries": detr.NUM_OBJECT_QUERIES, "num_classes": detr.NUM_CLASSES,
        "num_feature_levels": multi_scale.NUM_FEATURE_LEVELS, "enc_n_points": multi_scale.ENC_N_POINTS,
        "dec_n_points": multi_scale.DEC_N_POINTS, "dn_labelbook_size": dino.DN_LABELBOOK_SIZE,
        "dec_pred_class_embed_share": dino.SHARE_CLASS_HEADS, "dec_pred_bbox_embed_share": dino.SHARE_BOX_HEADS,
        "dilation": cfg.MODEL.RESNETS.RES5_DILATION == 2,
        # not in the tensors: the converter's --opts
        "num_select": multi_scale.TOPK_DETECTIONS, "dn_number": dino.DN_NUMBER,
    }
    assert found == {key: reference[key] for key in found}
    assert multi_scale.IN_FEATURES == ["res3", "res4", "res5"] and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 64
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == ((), ())  # 20 classes: no registered dataset
    assert "8 attention heads assumed" in stdout and "no training arguments in the file" in stdout
    assert "shared class heads, shared box heads" in stdout


def test_tensors_are_the_reference_ones_without_aliases_and_counters(converted):
    output, stdout = converted
    reference = reference_state_dict(NAME)
    ours = torch.load(output, weights_only=True)["model"]
    left_out = [key for key in reference if key.startswith(HEAD_ALIASES) or key.endswith("num_batches_tracked")]
    assert any(key.startswith(HEAD_ALIASES) for key in left_out)
    assert len(ours) == len(reference) - len(left_out)
    for key in ("label_enc.weight", "transformer.tgt_embed.weight", "transformer.enc_out_class_embed.bias",
                "transformer.decoder.ref_point_head.layers.1.weight", "class_embed.1.weight"):
        assert torch.equal(ours[key], reference[key]), key
    assert "class heads kept: 20 classes" in stdout and "label book 20" in stdout


def test_model_weights_reads_the_reference_checkpoint_directly(converted):
    """MODEL.WEIGHTS = the reference file gives the tensors the converter writes."""
    output, _ = converted
    model = build_model(converted_config(output))
    AtomicDetectionCheckpointer(model).load_for_inference(str(fixture_dir(NAME) / "checkpoint.pth"))
    expected = torch.load(output, weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_layout_is_detected_by_any_of_its_own_modules():
    state = reference_state_dict(NAME)
    assert detect_layout(state) is DINO
    assert detect_layout(reference_state_dict("deformable_upstream_tiny")) is DEFORMABLE
    assert detect_layout(reference_state_dict("deformable_upstream_two_stage_coco")) is DEFORMABLE
    for module in ("label_enc.", "transformer.tgt_embed.", "transformer.decoder.ref_point_head."):
        assert detect_layout({k: v for k, v in state.items() if not k.startswith(module)}) is DINO, module


@pytest.mark.parametrize("key", ["label_enc.weight", "transformer.tgt_embed.weight",
                                 "transformer.decoder.ref_point_head.layers.1.bias", "transformer.decoder.norm.weight",
                                 "transformer.enc_out_class_embed.weight", "transformer.level_embed",
                                 "class_embed.1.bias", "transformer.decoder.layers.1.norm3.weight"])
def test_a_missing_key_is_a_one_line_error_naming_file_and_key(key):
    state = {k: v for k, v in reference_state_dict(NAME).items() if k != key}
    with pytest.raises(ConversionError) as error:
        read_layout(state, "short.pth")
    message = str(error.value)
    assert message.startswith(f"short.pth: a DINO checkpoint without {key}") and "\n" not in message


def test_truncated_checkpoint_is_a_one_line_error_of_the_converter(tmp_path):
    source, output = tmp_path / "truncated.pth", tmp_path / "out.pth"
    torch.save({"model": {k: v for k, v in reference_state_dict(NAME).items()
                          if not k.startswith("transformer.decoder.ref_point_head.layers.0.")}}, source)
    (run,) = run_concurrently([[REPO / "tools" / "convert_detr_checkpoint.py", "--source", source, "--output",
                                output]], tmp_path)
    assert_one_line_error(run, str(source), "transformer.decoder.ref_point_head.layers.0.bias",
                          "transformer.decoder.ref_point_head.layers.0.weight")
    assert not output.exists() and not output.with_suffix(".yaml").exists()


def test_inconsistent_checkpoints_are_named():
    state = dict(reference_state_dict(NAME))
    state["transformer.decoder.bbox_embed.1.layers.0.bias"] = state["bbox_embed.1.layers.0.bias"] + 1
    with pytest.raises(ConversionError, match=r"^odd\.pth: transformer\.decoder\.bbox_embed\.1\.layers\.0\.bias "
                                              r"differs from bbox_embed\.1\.layers\.0\.bias"):
        read_layout(state, "odd.pth")
    state = dict(reference_state_dict(NAME), **{"transformer.patterns.weight": torch.zeros(1, 256)})
    with pytest.raises(ConversionError, match=r"^odd\.pth: keys the reference DINO .* transformer\.patterns\.weight$"):
        read_layout(state, "odd.pth")
    state = dict(reference_state_dict(NAME), **{"label_enc.weight": torch.zeros(20, 256)})
    with pytest.raises(ConversionError, match=r"^odd\.pth: label_enc\.weight has 20 rows for 20 classes"):
        read_layout(state, "odd.pth")


def test_training_arguments_give_what_no_tensor_holds_and_refuse_other_variants():
    reading = read_layout(reference_state_dict(NAME), "dino.pth")
    arguments = dict(reference_configuration(NAME), nheads=4, num_select=50, dn_number=7, pe_temperatureH=30,
                     pe_temperatureW=30, dec_pred_bbox_embed_share=False, cls_loss_coef=3.0)
    options, notes = reading.config(arguments)
    options = dict(options)
    assert (options["MODEL.DETR.NHEADS"], options["MODEL.MULTI_SCALE.ENC_N_POINTS"]) == (4, 8)
    assert (options["MODEL.MULTI_SCALE.TOPK_DETECTIONS"], options["MODEL.DINO.DN_NUMBER"]) == (50, 7)
    assert options["MODEL.MULTI_SCALE.POSITION_TEMPERATURE"] == 30 and options["MODEL.DETR.CLASS_WEIGHT"] == 3.0
    assert options["MODEL.DINO.SHARE_BOX_HEADS"] is False and options["MODEL.DINO.SHARE_CLASS_HEADS"] is True
    assert notes == []
    assert dict(reading.config(dict(arguments, use_dn=False))[0])["MODEL.DINO.DN_NUMBER"] == 0
    with pytest.raises(ConversionError, match=r"^dino\.pth: its training arguments say transformer_activation = "
                                              r"'gelu'; detr_d2's Dino computes transformer_activation = 'relu' only$"):
        reading.config(dict(arguments, transformer_activation="gelu"))


# ---------------------------------------------------------------- a 91-output COCO head
UNUSED_IDS = [i for i in range(91) if i not in COCO_CATEGORY_IDS]


def coco_state_dict(labelbook=95):
    """The fixture as a COCO model: 91-output class heads (category ids 0..90; one head shared
    by the decoder layers, as the reference's default, and the query selection's own), the
    11 unused ids' outputs far below the others (training makes them negatives only), and
    ``labelbook`` + 1 denoising label embeddings."""
    generator = torch.Generator().manual_seed(0)
    state = dict(reference_state_dict(NAME))
    hidden = state["class_embed.0.weight"].shape[1]
    for prefix in ("class_embed.0.", "transformer.enc_out_class_embed."):
        bias = torch.full((91,), -4.6) + 0.5 * torch.randn(91, generator=generator)
        bias[UNUSED_IDS] = -50.0
        state[prefix + "weight"] = 0.1 * torch.randn(91, hidden, generator=generator)
        state[prefix + "bias"] = bias
    for key in [k for k in state if k.startswith(("class_embed.", "transformer.decoder.class_embed."))]:
        state[key] = state["class_embed.0." + key.rsplit(".", 1)[1]]
    state["label_enc.weight"] = torch.randn(labelbook + 1, hidden, generator=generator)
    return state


def test_coco_heads_keep_the_category_rows_and_the_label_book_its_rows_beyond():
    state = coco_state_dict(labelbook=95)
    reading = read_layout(state, "coco.pth")
    for key in ("class_embed.0.weight", "class_embed.1.bias", "transformer.enc_out_class_embed.weight",
                "transformer.enc_out_class_embed.bias"):
        assert torch.equal(reading.state_dict[key], state[key][list(COCO_CATEGORY_IDS)]), key
    rows = list(COCO_CATEGORY_IDS) + [91, 92, 93, 94, 95]
    assert torch.equal(reading.state_dict["label_enc.weight"], state["label_enc.weight"][rows])
    options = dict(reading.config()[0])
    assert (options["MODEL.DETR.NUM_CLASSES"], options["MODEL.DINO.DN_LABELBOOK_SIZE"]) == (80, 84)
    assert "91 outputs -> 80" in " ".join(reading.notes)

    kept = read_layout(state, "coco.pth", keep_classes=True)
    assert all(torch.equal(kept.state_dict[key], state[key]) for key in kept.state_dict if key.startswith(CLASS_SIZED))
    assert (dict(kept.config()[0])["MODEL.DETR.NUM_CLASSES"], dict(kept.config()[0])["MODEL.DINO.DN_LABELBOOK_SIZE"]) \
        == (91, 95)

    dropped = read_layout(state, "coco.pth", drop_class_head=True)
    assert not any(key.startswith(CLASS_SIZED) for key in dropped.state_dict)
    assert not {"MODEL.DETR.NUM_CLASSES", "MODEL.DINO.DN_LABELBOOK_SIZE"} & set(dict(dropped.config()[0]))


def model_of(reading):
    """The ``Dino`` of a reading's config (on configs/Base-DINO.yaml), its tensors loaded
    strictly, in eval mode."""
    cfg = merge_config(add_detr_config(get_cfg()), str(REPO / "configs" / reading.layout.base_config),
                       ["MODEL.DEVICE", "cpu"])
    for key, value in reading.config()[0]:
        cfg.merge_from_list([key, value])
    model = build_model(cfg)
    model.load_state_dict(reading.state_dict)
    return model.eval()


def test_coco_classes_predict_what_the_91_output_model_predicts_at_its_coco_outputs():
    """The 80-class model and the 91-output one (--keep-classes) of the same file select the
    same queries and give the same boxes, the same logits at the COCO outputs (decoder
    layers and selected proposals), and so for denoising queries of the same targets (label
    embeddings of the category ids)."""
    state = coco_state_dict(labelbook=91)
    coco, full = model_of(read_layout(state, "coco.pth")), model_of(read_layout(state, "coco.pth", keep_classes=True))
    inputs = torch.load(fixture_dir(NAME) / "inputs.pt", weights_only=True)
    images = coco.preprocess_image([{"image": image} for image in chw_images(inputs)])
    targets = [{"labels": torch.tensor(labels), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3], [0.6, 0.3, 0.3, 0.2]])}
               for labels in ([0, 79], [5, 40])]
    category_targets = [dict(t, labels=torch.tensor(COCO_CATEGORY_IDS)[t["labels"]]) for t in targets]
    predictions = []
    with torch.no_grad():
        for model, model_targets in ((coco, targets), (full, category_targets)):
            denoising = make_denoising_queries(model_targets, model.label_enc, 30, model.num_classes, dn_number=3,
                                               label_noise_ratio=0.0, box_noise_scale=0.4,
                                               generator=torch.Generator().manual_seed(0))
            predictions.append(model.predict(images, denoising))
    (logits, boxes, extras), (full_logits, full_boxes, full_extras) = predictions
    columns = list(COCO_CATEGORY_IDS)
    torch.testing.assert_close(logits, full_logits[..., columns], atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes, full_boxes, atol=1e-6, rtol=0)
    torch.testing.assert_close(extras.interm_logits, full_extras.interm_logits[..., columns], atol=1e-5, rtol=0)
    torch.testing.assert_close(extras.dn_logits, full_extras.dn_logits[..., columns], atol=1e-5, rtol=0)
    torch.testing.assert_close(extras.dn_boxes, full_extras.dn_boxes, atol=1e-6, rtol=0)
