"""The fast paths compute what the plain paths compute (up to float rounding), and change
no parameter name: FrozenBatchNorm folded into convolutions, channels-last backbone,
oneDNN prepacked/fused ResNet at CPU inference, fused optimizer step."""
import copy

import pytest
import torch

import detr_d2  # noqa: F401  (first: compat fixes before detectron2.layers)
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone
from detectron2.utils.events import EventStorage

from detr_d2.acceleration import set_fast_paths
from detr_d2.acceleration.folded_norm import FrozenNormConv2d, fold_frozen_batchnorm
from detr_d2.acceleration.prepacked_resnet import prepacked_prefix_length, prepacked_resnet_forward
from detr_d2.engine import build_detr_optimizer
from detr_d2.engine.build import build_model
from detr_d2.engine.optimizer import set_fused_step
from tests.helpers import config, small_config, training_input


def randomize_frozen_norms(model, seed=0):
    """Give every FrozenBatchNorm2d statistics and an affine map far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            count = module.num_features
            module.weight.copy_(0.5 + torch.rand(count, generator=generator))
            module.bias.copy_(0.1 * torch.randn(count, generator=generator))
            module.running_mean.copy_(0.1 * torch.randn(count, generator=generator))
            module.running_var.copy_(0.5 + 1.5 * torch.rand(count, generator=generator))
    return model


@pytest.fixture(scope="module")
def model():
    """A small R18 DETR (FrozenBN backbone, stem + res2 frozen) with non-trivial norms."""
    return randomize_frozen_norms(build_model(small_config("MODEL.DETR.DROPOUT", "0.0")))


def detections(model, images, fast):
    set_fast_paths(model.eval(), fast)
    with torch.no_grad():
        return [out["instances"] for out in model([{"image": image} for image in images])]


def test_every_frozen_norm_conv_of_the_backbone_folds(model):
    convs = [m for m in model.backbone.modules() if hasattr(m, "norm") and isinstance(m.norm, FrozenBatchNorm2d)]
    assert convs and all(isinstance(conv, FrozenNormConv2d) for conv in convs)


def test_state_dict_keys_are_those_of_detectron2_backbone(model):
    plain_body = build_backbone(small_config())
    assert list(model.backbone.body.state_dict()) == list(plain_body.state_dict())
    model.backbone.body.load_state_dict(model.backbone.body.state_dict())  # strict: no key renamed


def test_folded_conv_equals_conv_then_frozen_norm(model):
    conv = model.backbone.body.res3[0].conv2
    x = torch.randn(2, conv.in_channels, 20, 24)
    conv.fold_norm = False
    plain = conv(x)
    conv.fold_norm = True
    torch.testing.assert_close(conv(x), plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv(x.contiguous(memory_format=torch.channels_last)), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("input_grad", [True, False])
def test_strided_shortcut_in_training_equals_conv_then_frozen_norm(model, input_grad):
    """The 1x1 stride-2 shortcut runs as a stride-1 conv on every other pixel with autograd
    on; odd sizes (21x25 -> 11x13) included; output and gradients as the plain conv + norm."""
    conv = model.backbone.body.res4[0].shortcut
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    weight = conv.weight
    weight.requires_grad_(True)
    x = torch.randn(2, conv.in_channels, 21, 25, requires_grad=input_grad)
    results = {}
    try:
        for fold in (False, True):
            conv.fold_norm = fold
            out = conv(x)
            grads = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(),
                                        [weight, x] if input_grad else [weight])
            results[fold] = (out, grads)
    finally:
        conv.fold_norm = True
    assert results[True][0].shape == (2, conv.out_channels, 11, 13)
    if input_grad:  # the fast output reads a subsampled view of the input
        inputs_of_conv = [f.name() for f, _ in results[True][0].grad_fn.next_functions if f is not None]
        assert any("Slice" in name for name in inputs_of_conv), inputs_of_conv
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    for fast, plain in zip(results[True][1], results[False][1], strict=True):
        assert_close_to_scale(fast, plain, 1e-5, "gradient")


def assert_same_detections(fast_detections, plain_detections, atol):
    """Scores and boxes divided by the image side within ``atol``, classes equal."""
    for fast, plain in zip(fast_detections, plain_detections, strict=True):
        torch.testing.assert_close(fast.scores, plain.scores, atol=atol, rtol=0)
        assert torch.equal(fast.pred_classes, plain.pred_classes)
        height, width = fast.image_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        torch.testing.assert_close(fast.pred_boxes.tensor / scale, plain.pred_boxes.tensor / scale,
                                   atol=atol, rtol=0)


def test_inference_outputs_equal_the_plain_path(model):
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8, generator=generator),
              torch.randint(0, 256, (3, 64, 52), dtype=torch.uint8, generator=generator)]
    assert_same_detections(detections(model, images, True), detections(model, images, False), 1e-5)


def prepacked_convs(model):
    """The backbone's folded convs whose cache holds a oneDNN-prepacked weight."""
    return [m for m in model.backbone.modules()
            if isinstance(m, FrozenNormConv2d) and m._folded is not None and m._folded[0][0][0] == "oneDNN"]


@pytest.mark.parametrize("name", ["detr_r50.yaml", "detr_r50_dc5.yaml"])
def test_prepacked_resnet_inference_equals_the_plain_path(name):
    """Bottleneck ResNets (res5 dilated in DC5) at inference: oneDNN prepacked, fused convs."""
    torch.manual_seed(0)
    model = randomize_frozen_norms(build_model(config(name, "MODEL.DETR.DROPOUT", "0.0")))
    keys = list(model.state_dict())
    image = torch.randint(0, 256, (3, 160, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    fast = detections(model, [image], True)
    assert model.backbone.prepacked and len(prepacked_convs(model)) == 53
    assert_same_detections(fast, detections(model, [image], False), 1e-4)
    assert list(model.state_dict()) == keys


def test_prepacked_weights_follow_a_loaded_state_dict(model):
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    before = detections(model, [image], True)
    assert prepacked_convs(model)
    saved = copy.deepcopy(model.state_dict())
    changed = {k: v * 1.5 if k.endswith("running_var") or k.endswith("conv1.weight") else v
               for k, v in saved.items()}
    model.load_state_dict(changed)
    try:
        after = detections(model, [image], True)
        assert not torch.allclose(after[0].scores, before[0].scores)
        assert_same_detections(after, detections(model, [image], False), 1e-5)
    finally:
        model.load_state_dict(saved)
    assert_same_detections(detections(model, [image], True), before, 1e-6)


def test_prepacked_forward_covers_all_at_inference_and_the_frozen_prefix_otherwise(model):
    """R18 with FREEZE_AT 2: stem + 4 stages at inference; stem + res2 in training; nothing
    in eval with autograd, for an input that needs a gradient, a float64 input or fast
    paths off."""
    image = torch.zeros(1, 3, 64, 64)
    set_fast_paths(model.eval(), True)
    assert model.backbone.prepacked
    body = model.backbone.body
    with torch.no_grad():
        assert prepacked_prefix_length(body, image) == 5
        assert prepacked_prefix_length(body, image.double()) == 0
    assert prepacked_prefix_length(body, image) == 0  # eval with autograd on
    model.train()
    assert prepacked_prefix_length(body, image) == 2
    assert prepacked_prefix_length(body, image.requires_grad_()) == 0
    model.eval()
    set_fast_paths(model.eval(), False)
    assert not model.backbone.prepacked
    assert prepacked_prefix_length(body, image.detach()) == 0  # folding off
    set_fast_paths(model, True)
    assert not build_model(small_config("MODEL.RESNETS.NORM", "GN")).backbone.prepacked


def losses_and_grads(model, batch, fast):
    set_fast_paths(model.train(), fast)
    model.zero_grad()
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_close_to_scale(actual, expected, relative, name):
    """|actual - expected| <= relative * max |expected| elementwise (float rounding in sums of
    many terms is relative to the largest terms, not to each element)."""
    error = (actual - expected).abs().max().item()
    assert error <= relative * expected.abs().max().item() + 1e-7, f"{name}: {error}"


def assert_training_equals_the_plain_path(model):
    torch.manual_seed(0)
    batch = [training_input(64, 80, [[4, 4, 30, 40], [40, 10, 70, 60]], [0, 2]),
             training_input(48, 64, [[2, 3, 40, 30]], [1])]
    fast_losses, fast_grads = losses_and_grads(model, batch, True)
    stem = model.backbone.body.stem.conv1
    assert stem._folded is not None and stem._folded[0][0] == ("oneDNN", (2, 3, 64, 80), torch.float32)  # prepacked prefix
    plain_losses, plain_grads = losses_and_grads(model, batch, False)
    for key, value in plain_losses.items():
        torch.testing.assert_close(fast_losses[key], value, atol=1e-5, rtol=1e-5, msg=key)
    assert set(fast_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        assert_close_to_scale(fast_grads[name], grad, 1e-5, name)
    return fast_grads


def test_training_losses_and_gradients_equal_the_plain_path(model):
    """FREEZE_AT 2: stem and res2 run prepacked without autograd, res3..res5 as modules."""
    fast_grads = assert_training_equals_the_plain_path(model)
    assert any(name.startswith("backbone.body.res3") for name in fast_grads)
    assert not any(name.startswith("backbone.body.res2") for name in fast_grads)


@pytest.mark.parametrize("freeze_at", [1, 3, 5])
def test_training_with_other_frozen_prefixes_equals_the_plain_path(freeze_at):
    """FREEZE_AT 5 freezes the whole ResNet: all of it runs prepacked, only the
    transformer, projection and heads train."""
    torch.manual_seed(1)
    model = randomize_frozen_norms(build_model(small_config(
        "MODEL.DETR.DROPOUT", "0.0", "MODEL.BACKBONE.FREEZE_AT", str(freeze_at))))
    assert prepacked_prefix_length(model.backbone.body.train(), torch.zeros(1, 3, 32, 32)) == freeze_at
    fast_grads = assert_training_equals_the_plain_path(model)
    trained_stages = {name.split(".")[2] for name in fast_grads if name.startswith("backbone.body.")}
    assert trained_stages == {f"res{i}" for i in range(freeze_at + 1, 6)}
    assert "input_proj.weight" in fast_grads


@pytest.mark.parametrize("opts", [[], ["SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.9"]])
def test_fused_optimizer_step_equals_the_plain_step(model, opts):
    cfg = small_config("SOLVER.BASE_LR", "0.01", *opts)
    assert cfg.SOLVER.FUSED_OPTIMIZER
    fused_model, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    fused, plain = build_detr_optimizer(cfg, fused_model), build_detr_optimizer(cfg, plain_model)
    set_fused_step(plain, False)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        for a, b in zip(fused_model.parameters(), plain_model.parameters()):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=generator)
                b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_fused_choice_survives_loading_a_state_dict(model):
    cfg = small_config()
    optimizer = build_detr_optimizer(cfg, model)
    saved = copy.deepcopy(optimizer.state_dict())
    for group in saved["param_groups"]:
        group["fused"] = None  # as saved by a plain optimizer
    optimizer.load_state_dict(saved)
    assert all(group["fused"] is True for group in optimizer.param_groups)


def test_channels_last_in_eval_only_where_every_norm_folds(model):
    image = torch.zeros(1, 3, 64, 64)
    set_fast_paths(model.eval(), True)
    assert model.backbone(image, [(64, 64)])[0].is_contiguous(memory_format=torch.channels_last)
    assert model.backbone.train()(image, [(64, 64)])[0].is_contiguous()
    set_fast_paths(model, True)
    assert model.backbone.channels_last
    group_norm = build_model(small_config("MODEL.RESNETS.NORM", "GN"))
    assert not group_norm.backbone.channels_last
    set_fast_paths(model, False)
    assert not model.backbone.channels_last


def test_kept_fold_follows_weight_changes(model):
    conv = model.backbone.body.res4[0].conv1
    x = torch.randn(1, conv.in_channels, 8, 8)
    with torch.no_grad():
        before = conv(x)
        conv.norm.running_var.mul_(4.0)  # in place, as load_state_dict and optimizers write
        after = conv(x)
        conv.fold_norm = False
        plain = conv(x)
        conv.fold_norm = True
        conv.norm.running_var.div_(4.0)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, plain, atol=1e-5, rtol=1e-5)


def test_a_model_with_prepacked_weights_can_be_copied(model):
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    before = detections(model, [image], True)
    assert prepacked_convs(model)
    copied = copy.deepcopy(model)
    assert not prepacked_convs(copied)
    assert_same_detections(detections(copied, [image], True), before, 1e-6)


def test_prepacked_forward_keeps_every_returned_feature_and_the_input():
    """The in-place residual sums must not overwrite a feature returned earlier (R18's first
    res2 block has no shortcut: its residual is the stem's output) nor the input."""
    cfg = small_config("MODEL.RESNETS.OUT_FEATURES", "['stem', 'res2', 'res3', 'res5']")
    body = randomize_frozen_norms(fold_frozen_batchnorm(build_backbone(cfg))).eval()
    image = torch.randn(1, 3, 64, 96)
    copy_of_image = image.clone()
    with torch.no_grad():
        fast = prepacked_resnet_forward(body, image)
        plain = body(image)
    assert torch.equal(image, copy_of_image)
    assert list(fast) == list(plain)
    for name, features in plain.items():
        torch.testing.assert_close(fast[name], features, atol=1e-4, rtol=1e-5, msg=name)
