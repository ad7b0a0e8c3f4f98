"""Dropout on 16-bit masks (``fast_dropout``) and the attention that uses it in CPU training:
drop rates, scaling, gradients, determinism, and equality with torch's modules wherever the
fast masks do not apply."""
import math

import pytest
import torch
from torch import nn

import detr_d2  # noqa: F401  (first: compat fixes before detectron2)
from detectron2.utils.events import EventStorage

from detr_d2.acceleration import set_fast_paths
from detr_d2.acceleration.fast_dropout import (FastMaskDropout, fast_dropout, keep_mask,
                                               quantised_drop_probability)
from detr_d2.acceleration.fast_mask_attention import FastMaskMultiheadAttention, attention
from detr_d2.engine.build import build_model
from tests.helpers import small_config, training_input


@pytest.mark.parametrize("p", [0.02, 0.1, 0.5])
def test_drop_rate_is_the_quantised_probability(p):
    torch.manual_seed(0)
    count = 2_000_003
    dropped = ~keep_mask((count,), p, "cpu")
    expected = quantised_drop_probability(p)
    assert abs(expected - p) <= 0.5 / 65536
    sigma = math.sqrt(expected * (1 - expected) / count)
    assert abs(dropped.float().mean().item() - expected) < 6 * sigma
    for slot in range(4):  # every 16-bit slice of the random words is used alike
        rate = dropped[slot::4].float().mean().item()
        assert abs(rate - expected) < 6 * sigma * 2


def test_neighbouring_elements_are_dropped_independently():
    torch.manual_seed(1)
    dropped = (~keep_mask((1_000_000,), 0.3, "cpu")).float()
    both = (dropped[:-1] * dropped[1:]).mean().item()
    rate = dropped.mean().item()
    assert abs(both - rate * rate) < 0.005


def test_kept_values_are_scaled_and_gradients_follow_the_mask():
    torch.manual_seed(2)
    x = torch.randn(300, 200, requires_grad=True)
    y = fast_dropout(x, 0.1)
    kept = y != 0
    scale = 1.0 / (1.0 - quantised_drop_probability(0.1))
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=1e-6, atol=0)
    weights = torch.randn(300, 200)
    (y * weights).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(kept, weights * scale, 0.0), rtol=1e-6, atol=0)


def test_expected_output_equals_the_input():
    torch.manual_seed(3)
    assert abs(fast_dropout(torch.ones(4_000_000), 0.25).mean().item() - 1.0) < 2e-3


def test_same_seed_same_masks_other_seed_other_masks():
    x = torch.randn(1000)
    torch.manual_seed(4)
    first = fast_dropout(x, 0.5)
    torch.manual_seed(4)
    assert torch.equal(first, fast_dropout(x, 0.5))
    torch.manual_seed(5)
    assert not torch.equal(first, fast_dropout(x, 0.5))


def test_dropout_module_is_torch_dropout_in_eval_or_when_switched_off():
    x = torch.randn(64, 64)
    module = FastMaskDropout(0.3)
    assert torch.equal(module.eval()(x), x)
    module.train().fast_masks = False
    torch.manual_seed(6)
    expected = nn.Dropout(0.3)(x)
    torch.manual_seed(6)
    assert torch.equal(module(x), expected)
    assert torch.equal(FastMaskDropout(0.0).train()(x), x)


def attention_inputs(seed=7):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(9, 3, 32, generator=generator, requires_grad=True)
    key = torch.randn(13, 3, 32, generator=generator)
    value = torch.randn(13, 3, 32, generator=generator)
    padding = torch.zeros(3, 13, dtype=torch.bool)
    padding[1, 9:] = True
    blocked = torch.zeros(9, 13, dtype=torch.bool)
    blocked[2, :4] = True
    return query, key, value, padding, blocked


@pytest.mark.parametrize("masks", ["both", "no padded key", "none"])
def test_written_out_attention_equals_torch_multihead_attention(masks):
    torch.manual_seed(8)
    module = nn.MultiheadAttention(32, 4)
    query, key, value, padding, blocked = attention_inputs()
    if masks != "both":
        padding = torch.zeros_like(padding)  # a batch without padding
        blocked = None if masks == "none" else blocked
    expected = module(query, key, value, key_padding_mask=padding, attn_mask=blocked, need_weights=False)[0]
    actual = attention(query, key, value, module.in_proj_weight, module.in_proj_bias, module.out_proj, 4,
                       padding, blocked)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    grad_expected, = torch.autograd.grad(expected.square().sum(), query)
    grad_actual, = torch.autograd.grad(actual.square().sum(), query)
    torch.testing.assert_close(grad_actual, grad_expected, rtol=1e-5, atol=1e-6)


def test_attention_module_keeps_torch_parameters_and_eval_outputs():
    torch.manual_seed(9)
    plain = nn.MultiheadAttention(32, 4, dropout=0.1)
    fast = FastMaskMultiheadAttention(32, 4, dropout=0.1)
    assert list(fast.state_dict()) == list(plain.state_dict())
    fast.load_state_dict(plain.state_dict())
    query, key, value, padding, blocked = attention_inputs()
    expected = plain.eval()(query, key, value, key_padding_mask=padding, need_weights=False)[0]
    torch.testing.assert_close(fast.eval()(query, key, value, key_padding_mask=padding, need_weights=False)[0],
                               expected, rtol=1e-5, atol=1e-6)


def test_training_attention_drops_weights_with_the_fast_mask():
    torch.manual_seed(10)
    module = FastMaskMultiheadAttention(32, 4, dropout=0.2).train()
    query, key, value, padding, blocked = attention_inputs()
    torch.manual_seed(11)
    actual = module(query, key, value, key_padding_mask=padding, attn_mask=blocked, need_weights=False)[0]
    torch.manual_seed(11)
    keep = keep_mask((3 * 4, 9, 13), 0.2, "cpu")
    scale = 1.0 / (1.0 - quantised_drop_probability(0.2))
    expected = attention(query, key, value, module.in_proj_weight, module.in_proj_bias, module.out_proj, 4,
                         padding, blocked, drop_weights=lambda weights: torch.where(keep, weights * scale, 0.0))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    module.fast_masks = False
    torch.manual_seed(11)
    torch_path = module(query, key, value, key_padding_mask=padding, attn_mask=blocked, need_weights=False)[0]
    assert not torch.allclose(torch_path, actual)


def test_detr_fast_paths_switch_the_masks():
    model = build_model(small_config("MODEL.DETR.DROPOUT", "0.1"))
    switchable = [m for m in model.modules() if isinstance(m, (FastMaskDropout, FastMaskMultiheadAttention))]
    assert switchable and all(m.fast_masks for m in switchable)
    set_fast_paths(model, False)
    assert not any(m.fast_masks for m in switchable)
    set_fast_paths(model, True)
    assert all(m.fast_masks for m in switchable)


def test_training_with_fast_masks_fits_a_batch():
    """80 AdamW steps on one batch with dropout 0.2 everywhere in the transformer (measured:
    the loss falls to 0.44x its start with fast masks, 0.60x with torch's, seed 12; 0.61x
    and 0.64x with seed 13)."""
    torch.manual_seed(12)
    model = build_model(small_config("MODEL.DETR.DROPOUT", "0.2")).train()
    batch = [training_input(64, 80, [[4, 4, 30, 40], [40, 10, 70, 60]], [0, 2]),
             training_input(48, 64, [[2, 3, 40, 30]], [1])]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    with EventStorage():
        for _ in range(80):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5]), losses
