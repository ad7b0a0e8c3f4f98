"""MODEL.DETR.FROZEN_WEIGHTS (the reference's second stage): a detector checkpoint is
loaded into the mask model's detection part and frozen; training steps change the mask
head only, and the detector stays in training mode as in the reference."""
import logging

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from detr_d2.engine.trainer import Trainer
from detr_d2.errors import SetupError
from tests.helpers import batch_with_masks, save_weights, small_config, tiny_model

DETECTOR_OPTS = ("MODEL.DETR.HIDDEN_DIM", "128", "MODEL.DETR.DROPOUT", "0.1")


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory):
    """A box model (no mask head) of the detector the mask config has, saved as a run would."""
    torch.manual_seed(1)
    detector = build_model(small_config(*DETECTOR_OPTS))
    return save_weights(detector, tmp_path_factory.mktemp("frozen") / "detector.pth"), detector.state_dict()


def train_steps(model, optimizer, steps):
    model.train()
    with EventStorage():
        for _ in range(steps):
            losses = model(batch_with_masks())
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()


def test_detector_loaded_frozen_and_unchanged_while_the_mask_head_trains(detector_file, caplog):
    path, detector_state = detector_file
    cfg = small_config(*DETECTOR_OPTS, "MODEL.MASK_ON", "True", "MODEL.DETR.FROZEN_WEIGHTS", str(path))
    with caplog.at_level(logging.INFO, logger="detectron2"):
        model = Trainer.build_model(cfg)
    assert "detector loaded from" in caplog.text and "training only the mask head" in caplog.text
    before = {name: value.clone() for name, value in model.state_dict().items()}
    for name, value in detector_state.items():
        assert torch.equal(before[name], value), name
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("mask_head.") for name in trainable)
    train_steps(model, Trainer.build_optimizer(cfg, model), steps=2)
    assert model.transformer.training  # the detector is frozen, not switched to eval
    after = model.state_dict()
    for name in detector_state:
        assert torch.equal(after[name], before[name]), f"frozen tensor {name} changed"
    changed = [name for name in after if name.startswith("mask_head.") and not torch.equal(after[name], before[name])]
    assert len(changed) == len([n for n in after if n.startswith("mask_head.")])


def test_a_checkpoint_of_another_detector_is_refused_naming_the_tensors(tmp_path):
    other = save_weights(tiny_model(), tmp_path / "other_detector.pth")
    cfg = small_config(*DETECTOR_OPTS, "MODEL.MASK_ON", "True", "MODEL.DETR.FROZEN_WEIGHTS", str(other))
    with pytest.raises(SetupError, match="MODEL.DETR.FROZEN_WEIGHTS .*other_detector.pth lacks .* detector tensor"):
        Trainer.build_model(cfg)
