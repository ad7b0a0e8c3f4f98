"""Group DETR's training-time query groups (MODEL.DETR.NUM_QUERY_GROUPS)."""
import subprocess
import sys

import torch
from detectron2.utils.events import EventStorage

from detr_d2.engine.build import build_model
from detr_d2.modeling.query_groups import group_self_attention_mask, groups_as_batch_entries
from tests.helpers import small_config, training_input

QUERIES, GROUPS = 7, 3


def grouped_model():
    torch.manual_seed(0)
    model = build_model(small_config("MODEL.DETR.NUM_QUERY_GROUPS", str(GROUPS), "MODEL.DETR.DROPOUT", "0.0"))
    return model.train()


def images_of(model):
    inputs = [training_input(96, 128, [[10, 10, 60, 50]], [1]), training_input(128, 96, [[5, 20, 40, 90]], [2])]
    return inputs, model.preprocess_image(inputs)


def test_mask_blocks_attention_across_groups_only():
    mask = group_self_attention_mask(3, 2)
    expected_allowed = torch.block_diag(*[torch.ones(2, 2, dtype=torch.bool)] * 3)
    assert torch.equal(~mask, expected_allowed)


def predict_with_queries(model, images, query_weights):
    """The model's outputs with ``query_weights`` [Q, C] as its only queries."""
    plain = build_model(small_config("MODEL.DETR.DROPOUT", "0.0")).train()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("extra_query_embed")}
    state["query_embed.weight"] = query_weights
    plain.load_state_dict(state)
    return plain.predict(images)


def test_each_group_computes_what_its_queries_would_alone():
    """Group g's outputs equal a plain DETR's with group g's query embeddings: the mask
    isolates the groups, so group 0 in training is exactly the inference model."""
    model = grouped_model()
    _, images = images_of(model)
    all_queries = torch.cat([model.query_embed.weight, model.extra_query_embed.weight]).detach()
    with torch.no_grad():
        logits, boxes = model.predict(images)
        assert logits.shape[2] == QUERIES * GROUPS
        for group in range(GROUPS):
            part = slice(group * QUERIES, (group + 1) * QUERIES)
            alone_logits, alone_boxes = predict_with_queries(model, images, all_queries[part])
            torch.testing.assert_close(logits[:, :, part], alone_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(boxes[:, :, part], alone_boxes, atol=1e-5, rtol=1e-5)


def test_groups_become_batch_entries_with_repeated_targets():
    logits = torch.arange(2 * 2 * 6 * 3, dtype=torch.float32).view(2, 2, 6, 3)
    boxes = torch.rand(2, 2, 6, 4)
    targets = [{"labels": torch.tensor([0])}, {"labels": torch.tensor([1, 2])}]
    split_logits, split_boxes, split_targets = groups_as_batch_entries(logits, boxes, targets, 3)
    assert split_logits.shape == (2, 6, 2, 3) and split_boxes.shape == (2, 6, 2, 4)
    torch.testing.assert_close(split_logits[:, 4], logits[:, 1, 2:4])  # image 1, group 1
    assert [len(t["labels"]) for t in split_targets] == [1, 1, 1, 2, 2, 2]


def test_training_uses_all_groups_and_inference_the_first():
    model = grouped_model()
    inputs, _ = images_of(model)
    with EventStorage():
        losses = model(inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.extra_query_embed.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        results = model([{"image": x["image"]} for x in inputs])
    assert all(len(r["instances"]) == QUERIES for r in results)


def test_slim_checkpoint_of_a_grouped_run_is_a_plain_detr(tmp_path):
    """tools/slim_checkpoint.py drops the extra groups' queries; the result loads strictly
    into the same model without query groups."""
    model = grouped_model()
    training_checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 9}, training_checkpoint)
    slim = tmp_path / "slim.pth"
    result = subprocess.run([sys.executable, "tools/slim_checkpoint.py", "--input", str(training_checkpoint),
                             "--output", str(slim)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    state = torch.load(slim, weights_only=True)["model"]
    assert not any(name.startswith("extra_query_embed") for name in state)
    build_model(small_config("MODEL.DETR.DROPOUT", "0.0")).load_state_dict(state, strict=True)
