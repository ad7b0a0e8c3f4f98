"""The fast paths under bfloat16 autocast (TEST.AMP / SOLVER.AMP on the CPU): the prepacked
oneDNN ResNet convolutions compute in bfloat16, folded weights are kept in bfloat16, the
results stay close to the plain model under the same autocast, and the reference-parity
fixtures keep their labels and boxes."""
import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.utils.events import EventStorage

from detr_d2.acceleration import accelerate, set_fast_paths
from detr_d2.acceleration.folded_norm import FrozenNormConv2d, fold_frozen_batchnorm
from detr_d2.engine.build import build_model
from tests.helpers import chw_images, converted_fixture_model, small_config, training_input
from tests.modeling.test_reference_parity import clipped_reference_boxes, remapped_reference_detections

BF16 = torch.bfloat16


def bf16_autocast():
    return torch.autocast("cpu", dtype=BF16)


def folded_keys(model):
    return [m._folded[0] for m in model.modules() if isinstance(m, FrozenNormConv2d) and m._folded is not None]


@pytest.fixture(scope="module")
def small_model():
    """R18 with FrozenBatchNorm (prepacked on the CPU), tiny transformer, 3 classes, no dropout
    (the fast and plain dropout masks differ)."""
    torch.manual_seed(0)
    return build_model(small_config("MODEL.DETR.DROPOUT", "0.0"))


def images(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=generator),
            torch.randint(0, 256, (3, 48, 72), dtype=torch.uint8, generator=generator)]


def inference(model, batch, fast):
    set_fast_paths(model, fast)
    with torch.no_grad(), bf16_autocast():
        features = model.backbone.body_features(model.preprocess_image(batch).tensor)
        results = [out["instances"] for out in model(batch)]
    return features, results


def test_prepacked_inference_computes_in_bf16_close_to_the_plain_path(small_model):
    model = small_model.eval()
    batch = [{"image": image} for image in images()]
    plain_features, plain = inference(model, batch, fast=False)
    fast_features, fast = inference(model, batch, fast=True)
    assert model.backbone.prepacked
    assert {f.dtype for f in fast_features.values()} == {BF16} == {f.dtype for f in plain_features.values()}
    keys = folded_keys(model)
    assert keys and all(key[0][0] == "oneDNN" and key[0][2] == BF16 for key in keys)
    for name in plain_features:
        difference = (fast_features[name].float() - plain_features[name].float()).abs().max()
        assert difference <= 0.05 * plain_features[name].float().abs().max(), name
    for a, b in zip(fast, plain):
        assert b.scores.dtype == torch.float32 == a.scores.dtype
        assert (a.scores - b.scores).abs().max() < 0.02
        assert (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max() < 0.01 * 80


def test_training_runs_the_frozen_prefix_prepacked_in_bf16(small_model):
    model = small_model.train()
    torch.manual_seed(1)
    batch = [training_input(64, 80, [[5, 5, 40, 40]], [0]), training_input(48, 72, [[3, 4, 30, 40]], [2])]
    losses = {}
    for fast in (False, True):
        set_fast_paths(model, fast)
        with EventStorage(0), bf16_autocast():
            losses[fast] = model(batch)
    stem = model.backbone.body.stem.conv1
    assert stem._folded[0][0] == ("oneDNN", (2, 3, 64, 80), BF16)
    for name, value in losses[False].items():
        assert value.dtype == torch.float32 == losses[True][name].dtype
        assert torch.isclose(losses[True][name], value, rtol=0.05, atol=0.02), name
    sum(losses[True].values()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    model.zero_grad(set_to_none=True)


def test_folded_weights_are_kept_in_the_autocast_dtype():
    torch.manual_seed(0)
    conv = Conv2d(8, 16, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(16))
    conv.norm.running_mean.uniform_(-1, 1)
    conv.norm.running_var.uniform_(0.5, 2)
    holder = fold_frozen_batchnorm(torch.nn.Sequential(conv)).eval()
    folded = holder[0]
    assert isinstance(folded, FrozenNormConv2d)
    x = torch.randn(2, 8, 12, 14)
    with torch.no_grad(), bf16_autocast():
        out = folded(x)
        folded.fold_norm = False
        unfolded = folded(x)
    folded.fold_norm = True
    assert out.dtype == BF16 and folded._folded[1][0].dtype == BF16
    torch.testing.assert_close(out.float(), unfolded.float(), atol=0.05, rtol=0.02)


# ---------------------------------------------------------------- reference-parity fixtures
def bf16_detections(model, images_chw):
    with torch.no_grad(), bf16_autocast():
        return [out["instances"] for out in model([{"image": im, "height": im.shape[1], "width": im.shape[2]}
                                                   for im in images_chw])]


def reference_detections(name, expected, mode, count):
    """(scores, labels, boxes, pred_logits) per image of the fixture's reference outputs."""
    items = ([(r["pred_logits"], r["detections"]) for r in expected["single"]] if mode == "single" else
             [(expected["batched"]["pred_logits"][i], expected["batched"]["detections"][i]) for i in range(count)])
    if name.endswith("coco92"):
        return [(*remapped_reference_detections(logits, det["boxes"]), logits) for logits, det in items]
    return [(det["scores"], det["labels"], det["boxes"], logits) for logits, det in items]


def top2_gap(logits):
    probabilities = logits.softmax(-1)[..., :-1].topk(2, dim=-1).values
    return probabilities[..., 0] - probabilities[..., 1]


@pytest.mark.parametrize("name", ["detr_upstream_tiny", "detr_upstream_r50dc5_coco92"])
def test_bf16_inference_keeps_the_reference_labels_and_boxes(name, converted_reference):
    """With the fast paths (TEST.AMP's default): every top-1 label kept, boxes within 1% of
    the image side (measured: at most 0.1%). The plain path under the same autocast keeps the
    boxes too, and every label whose two best classes are at least 0.01 apart (the random
    tiny fixture has a query at 0.2882 vs 0.2871, which bfloat16 may swap)."""
    model, inputs, expected = converted_fixture_model(name, converted_reference)
    accelerate(model, True)
    images_chw = chw_images(inputs)
    for fast in (True, False):
        set_fast_paths(model, fast)
        for mode in ("single", "batched"):
            outputs = ([bf16_detections(model, [im])[0] for im in images_chw] if mode == "single"
                       else bf16_detections(model, images_chw))
            references = reference_detections(name, expected, mode, len(images_chw))
            for instances, (scores, labels, boxes, logits), image in zip(outputs, references, images_chw):
                height, width = image.shape[1:]
                side = torch.tensor([width, height, width, height], dtype=torch.float32)
                deviation = (instances.pred_boxes.tensor - clipped_reference_boxes(boxes, image)).abs() / side
                assert deviation.max() < 0.01, (fast, mode)
                assert (instances.scores - scores).abs().max() < 0.01, (fast, mode)
                decided = slice(None) if fast else top2_gap(logits) >= 0.01
                assert torch.equal(instances.pred_classes[decided], labels[decided]), (fast, mode)
