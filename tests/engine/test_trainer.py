"""The Trainer's parts in-process: optimizer groups, clipping, LR schedule, config and
runtime checks, atomic checkpoints. The end-to-end runs are in test_train_net.py."""
import argparse
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from detr_d2 import add_detr_config
from detr_d2.engine import (
    AtomicDetectionCheckpointer,
    SetupError,
    Trainer,
    build_config,
    merge_config,
)
from detr_d2.engine import checkpointer as checkpointer_module
from detr_d2.engine.config_checks import check_weights_to_load
from tests.helpers import REPO, TINY_CONFIG, tiny_cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def fill_gradients(model, scale):
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale if p.requires_grad else None


def total_grad_norm(params, norm_type=2.0):
    return torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad, norm_type) for p in params]), norm_type).item()


# ---------------------------------------------------------------- optimizer groups
def test_backbone_gets_the_multiplied_lr_and_frozen_parameters_are_left_out(model):
    cfg = tiny_cfg("SOLVER.BASE_LR", 2e-4, "SOLVER.BACKBONE_MULTIPLIER", 0.1,
                   "SOLVER.WEIGHT_DECAY", 3e-4)
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(lr_of) == len(optimizer_params(optimizer)), "a parameter is in two groups"
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert any(".stem." in n for n in frozen) and any(".res2." in n for n in frozen)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in lr_of, name
        else:
            expected = 2e-5 if name.startswith("backbone.") else 2e-4
            assert lr_of[id(p)] == pytest.approx(expected), name
    assert {group["weight_decay"] for group in optimizer.param_groups} == {3e-4}


# The references' learning rates by parameter name: Deformable DETR's main.py (lr 2e-4;
# "backbone.0" 2e-5; "reference_points" / "sampling_offsets" 0.1x), DINO's 4-scale config
# (param_dict_type "default": names holding "backbone" 1e-5, every other one 1e-4).
REFERENCE_LRS = {
    "deformable_detr_r50.yaml": lambda name: 2e-5 if name.startswith("backbone.") or "reference_points" in name
    or "sampling_offsets" in name else 2e-4,
    "dino_r50_4scale_12ep.yaml": lambda name: 1e-5 if name.startswith("backbone.") else 1e-4,
}


@pytest.mark.parametrize("recipe", REFERENCE_LRS)
def test_multi_scale_recipes_give_each_parameter_its_references_lr(recipe):
    """The recipe's optimizer on a tiny model of its meta-architecture (the groups depend on
    parameter names, not sizes)."""
    cfg = build_config(str(REPO / "configs" / recipe), ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    tiny = build_model(tiny_cfg("MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE,
                                "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']"))
    optimizer = Trainer.build_optimizer(cfg, tiny)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trained = [(name, p) for name, p in tiny.named_parameters() if p.requires_grad]
    assert any("sampling_offsets" in name for name, _ in trained)
    for name, parameter in trained:
        assert lr_of[id(parameter)] == pytest.approx(REFERENCE_LRS[recipe](name)), name


def test_sgd_is_available(model):
    optimizer = Trainer.build_optimizer(tiny_cfg("SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", 0.8),
                                        model)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.8


@pytest.mark.parametrize("opts, named", [
    (("SOLVER.OPTIMIZER", "LAMB"), "SOLVER.OPTIMIZER"),
    (("SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "global"),
     "SOLVER.CLIP_GRADIENTS.CLIP_TYPE"),
])
def test_unsupported_optimizer_settings_are_named(model, opts, named):
    with pytest.raises(SetupError, match=named):
        Trainer.build_optimizer(tiny_cfg(*opts), model)


# ---------------------------------------------------------------- gradient clipping
def clipping_optimizer(model, clip_type, clip_value, norm_type=2.0):
    cfg = tiny_cfg("SOLVER.CLIP_GRADIENTS.ENABLED", True,
                   "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type,
                   "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", clip_value,
                   "SOLVER.CLIP_GRADIENTS.NORM_TYPE", norm_type, "SOLVER.BASE_LR", 0.0)
    return Trainer.build_optimizer(cfg, model)


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_full_model_clipping_bounds_the_global_gradient_norm(model, norm_type):
    optimizer = clipping_optimizer(model, "full_model", 0.1, norm_type)
    params = optimizer_params(optimizer)
    fill_gradients(model, scale=10.0)
    assert total_grad_norm(params, norm_type) > 100
    optimizer.step()
    assert total_grad_norm(params, norm_type) <= 0.1 * (1 + 1e-5)
    assert total_grad_norm(params, norm_type) == pytest.approx(0.1, rel=1e-4)


def test_detectron2_clip_types_clip_each_parameter(model):
    optimizer = clipping_optimizer(model, "value", 0.01)
    fill_gradients(model, scale=1.0)
    optimizer.step()
    assert max(p.grad.abs().max().item() for p in optimizer_params(optimizer)) <= 0.01

    optimizer = clipping_optimizer(model, "norm", 0.5)
    fill_gradients(model, scale=1.0)
    optimizer.step()
    assert max(p.grad.norm().item() for p in optimizer_params(optimizer)) <= 0.5 * (1 + 1e-5)


# ---------------------------------------------------------------- LR schedule
def test_lr_drops_at_the_steps_and_keeps_the_backbone_ratio(model):
    cfg = tiny_cfg("SOLVER.BASE_LR", 1e-4, "SOLVER.BACKBONE_MULTIPLIER", 0.1,
                   "SOLVER.MAX_ITER", 10, "SOLVER.STEPS", "(4,)", "SOLVER.GAMMA", 0.1)
    optimizer = Trainer.build_optimizer(cfg, model)
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    model.zero_grad(set_to_none=True)  # the steps below leave the weights unchanged
    history = []
    for _ in range(6):
        history.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert history[3] == pytest.approx([1e-4, 1e-5])
    assert history[4] == pytest.approx([1e-5, 1e-6])


# ---------------------------------------------------------------- config and runtime checks
def test_unknown_key_in_a_config_file_is_named_with_the_closest_key(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(f'_BASE_: "{TINY_CONFIG}"\nMODEL:\n  DETR:\n    HIDEN_DIM: 32\n')
    with pytest.raises(SetupError) as error:
        merge_config(add_detr_config(get_cfg()), str(config), [])
    message = str(error.value)
    assert "MODEL.DETR.HIDEN_DIM" in message and str(config) in message
    assert "MODEL.DETR.HIDDEN_DIM" in message


def test_overrides_must_come_in_pairs():
    with pytest.raises(SetupError, match="KEY VALUE pairs"):
        tiny_cfg("SOLVER.BASE_LR")


def test_the_weights_to_load_must_exist(tmp_path):
    with pytest.raises(SetupError, match="missing.pth"):
        check_weights_to_load(tiny_cfg("MODEL.WEIGHTS", tmp_path / "missing.pth"), resume=False)
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    cfg = tiny_cfg("OUTPUT_DIR", tmp_path, "MODEL.WEIGHTS", tmp_path / "missing.pth")
    with pytest.raises(SetupError, match="model_0000099.pth"):
        check_weights_to_load(cfg, resume=True)
    (tmp_path / "model_0000099.pth").touch()
    check_weights_to_load(cfg, resume=True)  # MODEL.WEIGHTS is not read when resuming


def test_frozen_weights_need_mask_on_and_an_existing_file(tmp_path):
    with pytest.raises(SetupError, match="MODEL.DETR.FROZEN_WEIGHTS is 'box.pth' but must be empty without "
                                         "MODEL.MASK_ON.*MODEL.WEIGHTS"):
        build_config(str(TINY_CONFIG), ["MODEL.DETR.FROZEN_WEIGHTS", "box.pth"])
    mask_on = ["MODEL.MASK_ON", "True", "MODEL.DETR.HIDDEN_DIM", "128", "MODEL.DETR.NHEADS", "8"]
    with pytest.raises(SetupError, match="MODEL.DETR.FROZEN_WEIGHTS is .*missing.pth.* existing detector checkpoint"):
        build_config(str(TINY_CONFIG), [*mask_on, "MODEL.DETR.FROZEN_WEIGHTS", str(tmp_path / "missing.pth")])
    assert build_config(str(TINY_CONFIG), ["MODEL.DETR.FROZEN_WEIGHTS", ""]).MODEL.DETR.FROZEN_WEIGHTS == ""


# ---------------------------------------------------------------- checkpoints
def test_checkpoints_are_written_atomically(model, tmp_path, monkeypatch):
    checkpointer = AtomicDetectionCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    saved = (tmp_path / "model_0000009.pth").read_bytes()

    def crash_halfway(data, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointer_module.torch, "save", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_0000009", iteration=19)
    assert (tmp_path / "model_0000009.pth").read_bytes() == saved
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]


def test_checkpoints_load_as_tensors_only(model, tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(SetupError, match="pickled.pth"):
        AtomicDetectionCheckpointer(model).load(str(path))
    torch.save({"model": model.state_dict()}, path)
    AtomicDetectionCheckpointer(model).load(str(path))


# ---------------------------------------------------------------- schedules
COCO_TRAIN_IMAGES = 118287  # all of train2017: FILTER_EMPTY_ANNOTATIONS is False there


@pytest.mark.parametrize("name, epochs, drop_epoch", [("detr_r50_500ep", 500, 400),
                                                      ("detr_r50_150ep", 150, 100)])
def test_schedules_follow_the_epochs_to_iterations_rule(name, epochs, drop_epoch):
    cfg = build_config(str(REPO / "configs" / "schedules" / f"{name}.yaml"), [])
    solver = cfg.SOLVER

    def iterations(n_epochs):
        return math.ceil(n_epochs * COCO_TRAIN_IMAGES / solver.IMS_PER_BATCH)

    assert not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert (solver.IMS_PER_BATCH, solver.BASE_LR, solver.WEIGHT_DECAY) == (64, 1e-4, 1e-4)
    assert solver.BASE_LR * solver.BACKBONE_MULTIPLIER == pytest.approx(1e-5)
    assert solver.CLIP_GRADIENTS.ENABLED and solver.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert solver.CLIP_GRADIENTS.CLIP_VALUE == 0.1
    assert solver.MAX_ITER == iterations(epochs)
    assert tuple(solver.STEPS) == (iterations(drop_epoch),) and solver.GAMMA == 0.1
