"""The Detr meta-architecture built from configs: sizes, training and inference contracts."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from detr_d2.modeling import DeformableDetr
from detr_d2.modeling.box_ops import (absolute_xyxy_to_normalized_cxcywh, generalized_box_iou,
                                     normalized_cxcywh_to_absolute_xyxy, paired_generalized_box_iou)
from tests.helpers import REPO, batch_with_masks, config, merged_config, parameter_counts, small_config, training_input


@pytest.mark.parametrize("name, opts, total, trainable", [
    ("detr_r50.yaml", ["MODEL.DETR.NUM_CLASSES", "2"], None, 41_279_495),
    ("detr_r50.yaml", [], 41_521_941, 41_299_541),
    ("detr_r101.yaml", [], 60_461_845, 60_239_445),
    ("detr_r50_dc5.yaml", [], 41_521_941, 41_299_541),
])
def test_parameter_counts_equal_the_reference(name, opts, total, trainable):
    counts = parameter_counts(build_model(config(name, *opts)))
    assert counts[1] == trainable
    if total is not None:
        assert counts[0] == total


def test_stem_and_res2_are_frozen():
    model = build_model(small_config())
    frozen = {n.split(".")[2] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "res2"}


def test_training_returns_weighted_losses_and_logs_errors_to_event_storage():
    model = build_model(small_config("MODEL.DETR.DROPOUT", "0.0"))
    model.train()
    batch = [training_input(64, 80, [[4, 4, 30, 40], [40, 10, 70, 60]], [0, 2]),
             training_input(48, 64, [], [])]
    with EventStorage() as storage:
        losses = model(batch)
        logged = {k: v[0] for k, v in storage.latest().items()}
    expected_keys = {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    assert set(losses) == expected_keys
    assert {"class_error", "cardinality_error", "cardinality_error_0"} <= set(logged)
    with torch.no_grad():
        unweighted = model.criterion(*model.predict(model.preprocess_image(batch)),
                                     model.prepare_targets(batch, [(64, 80), (48, 64)]))
    torch.testing.assert_close(losses["loss_bbox"], 5.0 * unweighted["loss_bbox"])
    torch.testing.assert_close(losses["loss_giou_0"], 2.0 * unweighted["loss_giou_0"])
    sum(losses.values()).backward()
    assert model.class_embed.weight.grad is not None


def test_batch_without_any_object_trains():
    model = build_model(small_config())
    model.train()
    losses = model([training_input(40, 40, [], []), training_input(40, 56, [], [])])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_ce"].item() > 0
    sum(losses.values()).backward()


def test_without_deep_supervision_only_final_losses():
    model = build_model(small_config("MODEL.DETR.DEEP_SUPERVISION", "False"))
    model.train()
    losses = model([training_input(40, 40, [[2, 2, 20, 20]], [1])])
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}


@pytest.mark.parametrize("opts", [[], ["MODEL.DETR.PRE_NORM", "True"], ["MODEL.DETR.POSITION_EMBEDDING", "learned"]])
def test_inference_returns_every_query_in_requested_size(opts):
    model = build_model(small_config(*opts))
    model.eval()
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    with torch.no_grad():
        outputs = model([{"image": image, "height": 100, "width": 140}, {"image": image[:, :30]}])
    first, second = outputs[0]["instances"], outputs[1]["instances"]
    assert len(first) == len(second) == 7
    assert first.image_size == (100, 140) and second.image_size == (30, 70)
    boxes = first.pred_boxes.tensor
    assert (boxes[:, 0::2] <= 140).all() and (boxes[:, 1::2] <= 100).all() and (boxes >= 0).all()
    assert ((first.scores > 0) & (first.scores < 1)).all()
    assert first.pred_classes.max() < 3


def test_inference_boxes_scale_with_the_requested_size():
    model = build_model(small_config())
    model.eval()
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    with torch.no_grad():
        small, large = (model([{"image": image, "height": h, "width": w}])[0]["instances"] for h, w in [(50, 70), (100, 140)])
    torch.testing.assert_close(large.pred_boxes.tensor, 2 * small.pred_boxes.tensor)


def test_inference_with_losses_gives_forward_detections_and_each_images_criterion():
    """One pass: the eval output of ``forward`` and, per image, the criterion run by hand on
    that image's slice of the batch's predictions (its own box count normalises); an image
    without objects has class_error 100, as in the reference."""
    model = build_model(small_config("MODEL.DETR.DROPOUT", "0.0"))
    model.eval()
    batch = [training_input(64, 80, [[4, 4, 30, 40], [40, 10, 70, 60], [5, 30, 25, 60]], [0, 2, 1]),
             training_input(48, 64, [], [])]
    for item, (height, width) in zip(batch, [(128, 160), (48, 64)]):
        item.update(height=height, width=width)
    with torch.no_grad():
        results, losses = model.inference_with_losses(batch)
        expected_results = model(batch)
        images = model.preprocess_image(batch)
        logits, boxes = model.predict(images)
        targets = model.prepare_targets(batch, images.image_sizes)
        by_hand = [model.criterion(logits[:, i:i + 1], boxes[:, i:i + 1], [targets[i]]) for i in range(2)]
    for result, expected in zip(results, expected_results):
        assert result["instances"].image_size == expected["instances"].image_size
        torch.testing.assert_close(result["instances"].pred_boxes.tensor, expected["instances"].pred_boxes.tensor)
        torch.testing.assert_close(result["instances"].scores, expected["instances"].scores)
    assert len(losses) == 2
    assert set(losses[0]) == set(by_hand[0]) >= {"loss_ce", "loss_bbox_0", "class_error", "cardinality_error_0"}
    for image_losses, expected in zip(losses, by_hand):
        for name, value in expected.items():
            torch.testing.assert_close(image_losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert losses[1]["class_error"].item() == 100.0 and losses[1]["loss_bbox"].item() == 0.0


def test_inference_with_losses_with_masks_pads_each_images_target_to_the_batch():
    """With a mask head the per-image values hold the mask losses; the smaller image's target
    masks are zero-padded to the padded batch, the area its mask logits cover, as in training."""
    torch.manual_seed(0)
    model = build_model(small_config("MODEL.MASK_ON", "True", "MODEL.DETR.HIDDEN_DIM", "128",
                                     "MODEL.DETR.DROPOUT", "0.0"))
    model.eval()
    batch = batch_with_masks()
    with torch.no_grad():
        results, losses = model.inference_with_losses(batch)
        images = model.preprocess_image(batch)
        logits, boxes, mask_logits = model.predict_with_masks(images)
        targets = model.prepare_targets(batch, images.image_sizes)
        padded = dict(targets[1], masks=torch.nn.functional.pad(targets[1]["masks"], (0, 16, 0, 16)))
        by_hand = [model.criterion(logits[:, i:i + 1], boxes[:, i:i + 1], [target], mask_logits[i:i + 1])
                   for i, target in enumerate([targets[0], padded])]
    assert results[0]["instances"].pred_masks.shape == (7, 64, 80)
    for image_losses, expected in zip(losses, by_hand):
        assert {"loss_mask", "loss_dice"} <= set(image_losses)
        for name, value in expected.items():
            torch.testing.assert_close(image_losses[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        build_model(small_config("MODEL.DETR.NUM_CLASSES", "0"))
    with pytest.raises(ValueError, match="HIDDEN_DIM"):
        build_model(small_config("MODEL.DETR.HIDDEN_DIM", "30", "MODEL.DETR.NHEADS", "8"))
    with pytest.raises(ValueError, match="POSITION_EMBEDDING"):
        build_model(small_config("MODEL.DETR.POSITION_EMBEDDING", "rope"))


def test_box_conversions_round_trip():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 200.0, 100.0]])
    normalized = absolute_xyxy_to_normalized_cxcywh(xyxy, height=100, width=200)
    torch.testing.assert_close(normalized, torch.tensor([[0.15, 0.3, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]]))
    torch.testing.assert_close(normalized_cxcywh_to_absolute_xyxy(normalized, 100, 200), xyxy)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_paired_generalized_iou_is_the_pairwise_diagonal_with_its_gradients(eps):
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(40, 2, 2, generator=generator).sort(dim=1).values
    boxes = corners.transpose(1, 2).flatten(1)[:, [0, 2, 1, 3]]
    first, second = boxes[:20].clone().requires_grad_(), boxes[20:].clone().requires_grad_()
    second.data[:3] = first.data[:3]
    second.data[3] = torch.tensor([2.0, 2.0, 3.0, 3.0])
    paired = paired_generalized_box_iou(first, second, eps)
    diagonal = torch.diag(generalized_box_iou(first, second, eps))
    torch.testing.assert_close(paired, diagonal, rtol=0, atol=1e-7)
    assert paired[:3].allclose(torch.ones(3), atol=1e-4) and paired[3] < -0.5
    paired_gradients = torch.autograd.grad(paired.sum(), (first, second))
    diagonal_gradients = torch.autograd.grad(diagonal.sum(), (first, second))
    for paired_gradient, diagonal_gradient in zip(paired_gradients, diagonal_gradients):
        torch.testing.assert_close(paired_gradient, diagonal_gradient, rtol=0, atol=1e-6)


SHIPPED_CONFIGS = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_shipped_config_loads_and_builds_a_model(name):
    """Each YAML under configs/ resolves its _BASE_ chain with only known keys and builds its
    model (NUM_CLASSES 2 and, for a panoptic config, class 0 a thing, where the config
    leaves them to the data): DETR's class head has a no-object output, the sigmoid heads of
    the multi-scale models (one per decoder layer) do not."""
    cfg = merged_config(name)
    if cfg.MODEL.DETR.NUM_CLASSES is None:
        cfg.MODEL.DETR.NUM_CLASSES = 2
    if cfg.MODEL.DETR.PANOPTIC_ON and cfg.MODEL.DETR.PANOPTIC_THING_IDS is None:
        cfg.MODEL.DETR.PANOPTIC_THING_IDS = [0]
    model = build_model(cfg)
    if isinstance(model, DeformableDetr):
        assert {head.out_features for head in model.class_embed} == {cfg.MODEL.DETR.NUM_CLASSES}
        assert len(model.class_embed) >= cfg.MODEL.DETR.DEC_LAYERS
    else:
        assert model.class_embed.out_features == cfg.MODEL.DETR.NUM_CLASSES + 1


def test_dino_proposal_heads_start_as_the_decoder_heads():
    """As the reference's: the encoder's class head at the focal prior, its box head's last layer zero."""
    model = build_model(config("dino_r50_4scale_12ep.yaml", "MODEL.RESNETS.DEPTH", "18",
                               "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.DETR.NUM_CLASSES", "3",
                               "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2"))
    transformer = model.transformer
    for encoder_head, decoder_head in ((transformer.enc_out_class_embed, model.class_embed[0]),
                                       (transformer.enc_out_bbox_embed, model.bbox_embed[0])):
        for name, value in encoder_head.state_dict().items():
            assert torch.equal(value, decoder_head.state_dict()[name]), name
    assert torch.allclose(transformer.enc_out_class_embed.bias, torch.full((3,), -4.59512), atol=1e-5)
    assert not transformer.enc_out_bbox_embed.layers[-1].weight.any()


def test_dino_content_queries_start_xavier_uniform():
    """The reference's content queries end its initialisation Xavier-uniform (bound
    sqrt(6 / (queries + hidden))), not standard normal."""
    model = build_model(config("dino_r50_4scale_12ep.yaml", "MODEL.RESNETS.DEPTH", "18",
                               "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.DETR.NUM_CLASSES", "3",
                               "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2"))
    weight = model.transformer.tgt_embed.weight
    bound = (6 / sum(weight.shape)) ** 0.5
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
