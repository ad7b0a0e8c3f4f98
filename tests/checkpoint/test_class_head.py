"""A class head carried over by name: known rows kept, new rows fresh, no-object kept."""
import pytest
import torch

from detr_d2.checkpoint.class_head import class_head_by_name


def test_rows_follow_the_names_and_no_object_stays_last():
    weight = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)  # a, b, c, no-object
    bias = torch.tensor([10.0, 11.0, 12.0, 13.0])
    other = torch.ones(2)
    state, kept = class_head_by_name({"class_embed.weight": weight, "class_embed.bias": bias, "x": other},
                                     ["a", "b", "c"], ["c", "new", "a"])
    assert kept == ["c", "a"]
    new_weight, new_bias = state["class_embed.weight"], state["class_embed.bias"]
    assert new_weight.shape == (4, 3) and new_bias.shape == (4,)
    assert torch.equal(new_weight[0], weight[2]) and torch.equal(new_weight[2], weight[0])
    assert torch.equal(new_weight[3], weight[3]) and new_bias.tolist()[::2] == [12.0, 10.0] and new_bias[3] == 13.0
    assert not any(torch.equal(new_weight[1], row) for row in weight)  # a fresh row
    assert state["x"] is other
    again, _ = class_head_by_name({"class_embed.weight": weight, "class_embed.bias": bias}, ["a", "b", "c"],
                                  ["c", "new", "a"])
    assert torch.equal(again["class_embed.weight"], new_weight)  # seeded


def test_a_head_that_does_not_fit_the_names_is_refused():
    with pytest.raises(ValueError, match="4 rows, not 2 classes"):
        class_head_by_name({"class_embed.weight": torch.zeros(4, 3), "class_embed.bias": torch.zeros(4)},
                           ["a", "b"], ["a"])
