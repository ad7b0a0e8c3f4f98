"""The gathered deformable attention (weighted ``embedding_bag`` sums over all levels, with its
own backward) computes what the plain definition (``grid_sample`` per level) computes,
forward and backward, at inference and in training, and ``accelerate`` puts it and the
backbone fast paths into DeformableDetr."""
import pytest
import torch
from detectron2.utils.events import EventStorage
from torch import nn

from detr_d2.acceleration import accelerate, set_fast_paths
from detr_d2.acceleration.fast_backbone import FastMaskedBackbone
from detr_d2.acceleration.fast_deformable_attention import (CornerGather, FastMultiScaleDeformableAttention,
                                                            gathered_deformable_attention, sampling_layout,
                                                            table_dtype)
from detr_d2.acceleration.folded_norm import FrozenNormConv2d
from detr_d2.engine.build import build_model
from detr_d2.modeling.deformable_detr import DeformableDetr
from detr_d2.modeling.deformable_transformer import scaled_reference_points
from detr_d2.modeling.multi_scale.deformable_attention import (MultiScaleDeformableAttention,
                                                               multi_scale_deformable_attention)
from detr_d2.modeling.multi_scale.encoder import valid_ratios
from tests.helpers import config, training_input

TOLERANCE = 1e-5


def assert_close_to_scale(actual, expected, msg=None):
    """Within 1e-5 of ``expected``'s largest magnitude (at least 1) or 1e-5 relative."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=TOLERANCE * scale, rtol=TOLERANCE, msg=msg)

# (H_l, W_l) per level: odd sizes, a 1x1 level, a single level, a wide and a tall map.
LEVEL_SHAPES = {
    "odd sizes": [[7, 9], [4, 5], [3, 3], [1, 1]],
    "one level": [[6, 11]],
    "wide and tall": [[2, 13], [9, 3]],
}


def core_inputs(shapes, batch=2, queries=13, heads=4, head_dim=8, points=3, on_borders=False, seed=0):
    """value [N, S, M, C/M], locations [N, Lq, M, L, P, 2] over [-0.3, 1.3] (a fifth of
    them outside the map; with ``on_borders`` all on cell borders, i.e. whole pixel
    coordinates, some outside the map), weights [N, Lq, M, L, P]."""
    generator = torch.Generator().manual_seed(seed)
    positions = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, positions, heads, head_dim, generator=generator)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator) * 1.6 - 0.3
    if on_borders:
        sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None, :]
        locations = (torch.randint(-2, 14, locations.shape, generator=generator) + 0.5) / sizes
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator)
    return value, torch.tensor(shapes), locations, weights


def values_and_gradients(function, value, shapes, locations, weights, upstream):
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    output = function(inputs[0], shapes, inputs[1], inputs[2])
    return output, torch.autograd.grad(output, inputs, upstream)


@pytest.mark.parametrize("name", sorted(LEVEL_SHAPES))
def test_gathered_attention_and_its_gradients_equal_the_plain_definition(name):
    value, shapes, locations, weights = core_inputs(LEVEL_SHAPES[name])
    outside = (locations < 0) | (locations > 1)
    assert outside.any() and not outside.all()
    upstream = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    plain, plain_grads = values_and_gradients(multi_scale_deformable_attention, value, shapes, locations, weights,
                                              upstream)
    fast, fast_grads = values_and_gradients(gathered_deformable_attention, value, shapes, locations, weights,
                                            upstream)
    assert_close_to_scale(fast, plain)
    for wrt, fast_grad, plain_grad in zip(("value", "locations", "weights"), fast_grads, plain_grads):
        assert_close_to_scale(fast_grad, plain_grad, msg=wrt)


def test_locations_on_cell_borders_give_the_plain_values():
    value, shapes, locations, weights = core_inputs(LEVEL_SHAPES["odd sizes"], on_borders=True)
    assert_close_to_scale(gathered_deformable_attention(value, shapes, locations, weights),
                          multi_scale_deformable_attention(value, shapes, locations, weights))


def test_level_sizes_given_as_pairs_of_ints_give_the_same_output():
    value, shapes, locations, weights = core_inputs(LEVEL_SHAPES["odd sizes"])
    pairs = [tuple(shape) for shape in shapes.tolist()]
    torch.testing.assert_close(gathered_deformable_attention(value, pairs, locations, weights),
                               gathered_deformable_attention(value, shapes, locations, weights), atol=0, rtol=0)


def test_samples_outside_every_map_are_zero():
    value, shapes, locations, weights = core_inputs(LEVEL_SHAPES["odd sizes"])
    locations = torch.where(locations < 0.5, locations - 2.0, locations + 2.0)
    assert gathered_deformable_attention(value, shapes, locations, weights).abs().max() == 0


def attention_modules(seed=0, d_model=32, levels=3, heads=4, points=2):
    """(plain module, an accelerated copy of it) with random (not the initial) projections."""
    torch.manual_seed(seed)
    plain = MultiScaleDeformableAttention(d_model, levels, heads, points)
    for parameter in plain.parameters():
        nn.init.normal_(parameter, std=0.3)
    holder = accelerate(nn.Sequential(MultiScaleDeformableAttention(d_model, levels, heads, points)))
    holder[0].load_state_dict(plain.state_dict())
    return plain, holder[0]


def padded_batch_inputs(reference_size, seed=1, d_model=32):
    """A padded batch of two images on 3 levels of odd sizes, the second image covering 5
    of 7 rows and 6 of 9 columns: query [2, 10, C], reference points [2, 10, 3, 2] or boxes
    [2, 10, 3, 4] (scaled by the valid ratios, as the decoder scales them), value_input
    [2, S, C], spatial_shapes [3, 2], padding mask [2, S]."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[7, 9], [4, 5], [2, 3]])
    masks = []
    for height, width in shapes.tolist():
        mask = torch.zeros(2, height, width, dtype=torch.bool)
        mask[1, -(-5 * height // 7):, :] = True
        mask[1, :, -(-6 * width // 9):] = True
        masks.append(mask)
    ratios = torch.stack([valid_ratios(mask) for mask in masks], 1)
    padding_mask = torch.cat([mask.flatten(1) for mask in masks], 1)
    query = torch.randn(2, 10, d_model, generator=generator)
    value_input = torch.randn(2, padding_mask.shape[1], d_model, generator=generator)
    reference = scaled_reference_points(torch.rand(2, 10, reference_size, generator=generator), ratios)
    return query, reference, value_input, shapes, padding_mask


@pytest.mark.parametrize("reference_size", [2, 4])
def test_accelerated_module_equals_the_plain_one_on_a_padded_batch(reference_size):
    """At inference (no autograd) the accelerated module gathers; its output is the plain
    module's, for reference points and (4-d) reference boxes."""
    plain, fast = attention_modules()
    assert isinstance(fast, FastMultiScaleDeformableAttention) and fast.fast_sampling
    assert list(fast.state_dict()) == list(plain.state_dict())
    inputs = padded_batch_inputs(reference_size)
    with torch.no_grad():
        assert_close_to_scale(fast(*inputs), plain(*inputs))


def autograd_functions(output):
    """Names of the backward functions of ``output``'s graph."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        function = stack.pop()
        if function is not None and function not in seen:
            seen.add(function)
            stack.extend(next_function for next_function, _ in function.next_functions)
    return {type(function).__name__ for function in seen}


@pytest.mark.parametrize("reference_size", [2, 4])
def test_accelerated_module_gathers_in_training_with_the_plain_gradients(reference_size):
    """With autograd (training) the accelerated module gathers too (CornerGather, no
    grid_sample): the plain module's output and gradients to the query, the reference points
    or boxes, the value input and every parameter."""
    plain, fast = attention_modules()
    upstream = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(5))
    results = []
    for module in (plain, fast):
        query, reference, value_input, shapes, mask = padded_batch_inputs(reference_size)
        inputs = [t.requires_grad_() for t in (query, reference, value_input)]
        output = module(*inputs, shapes, mask)
        names = autograd_functions(output)
        output.backward(upstream)
        results.append((output.detach(), [t.grad for t in inputs],
                        {name: p.grad.clone() for name, p in module.named_parameters()}, names))
    (plain_output, plain_inputs, plain_params, plain_names), (output, grads, params, names) = results
    assert "GridSampler2DBackward0" in plain_names
    assert "CornerGatherBackward" in names and "GridSampler2DBackward0" not in names
    assert_close_to_scale(output, plain_output)
    for wrt, grad, plain_grad in zip(("query", "reference points", "value input"), grads, plain_inputs):
        assert_close_to_scale(grad, plain_grad, msg=wrt)
    assert set(params) == set(plain_params)
    for name, grad in plain_params.items():
        assert_close_to_scale(params[name], grad, msg=name)


def test_corner_gather_gradients_pass_gradcheck():
    """CornerGather's backward (sampled dot products for the corner weights, the sorted
    transposed gather for the table) against finite differences, in float64 on the rows a
    real layout gives (2 images, 3 levels, 2 heads, 2 points; locations partly outside)."""
    shapes = [(3, 4), (2, 3), (1, 2)]
    layout = sampling_layout(shapes, 2, 2, 2, "cpu")
    generator = torch.Generator().manual_seed(0)
    queries, k = 5, 2 * len(shapes) * 2
    x = torch.rand(2, queries, k, generator=generator, dtype=torch.float64) * 8 - 1
    y = torch.rand(2, queries, k, generator=generator, dtype=torch.float64) * 6 - 1
    x = torch.minimum(x.clamp(min=0), layout.bounds[0].double())
    y = torch.minimum(y.clamp(min=0), layout.bounds[1].double())
    top_left = (y.long() * layout.line_steps).add_(x.long(), alpha=2).add_(layout.first_rows).view(-1, 6)
    line = layout.line_steps[:6]
    steps = torch.stack([torch.full_like(line, 2), line, line + 2])
    table = torch.randn(layout.rows, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = [torch.rand(top_left.shape, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(4)]
    assert torch.autograd.gradcheck(lambda t, *w: CornerGather.apply(t, top_left.int(), steps.int(), *w),
                                    (table, *weights))


def test_the_table_keeps_16_bit_values_at_inference_only():
    """At inference the gather reads bfloat16 values as they are; when autograd records, and
    for float32 values, the table is float32."""
    with torch.no_grad():
        assert table_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
        assert table_dtype(torch.float32, torch.float32) == torch.float32
    assert table_dtype(torch.bfloat16, torch.float32) == torch.float32


def test_set_fast_paths_switches_the_sampling():
    plain, fast = attention_modules()
    holder = nn.Sequential(fast)
    set_fast_paths(holder, False)
    assert not fast.fast_sampling
    inputs = padded_batch_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(fast(*inputs), plain(*inputs), atol=0, rtol=0)
    set_fast_paths(holder, True)
    assert fast.fast_sampling


# ---------------------------------------------------------------- the whole model
def small_deformable_config(*opts):
    """DeformableDetr on an R18 with FrozenBatchNorm (foldable, prepacked on the CPU), 4
    levels, hidden 32, 1 + 2 layers, 7 queries, no dropout."""
    return config("deformable_detr_r50.yaml", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                  "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "4", "MODEL.DETR.DIM_FEEDFORWARD", "64",
                  "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.NUM_OBJECT_QUERIES", "7",
                  "MODEL.DETR.NUM_CLASSES", "3", "MODEL.DETR.DROPOUT", "0.0", "MODEL.MULTI_SCALE.ENC_N_POINTS", "2",
                  "MODEL.MULTI_SCALE.DEC_N_POINTS", "2", "MODEL.MULTI_SCALE.TOPK_DETECTIONS", "10", *opts)


@pytest.fixture(scope="module", params=["plain", "refine_two_stage"])
def deformable_config(request):
    opts = () if request.param == "plain" else ("MODEL.MULTI_SCALE.WITH_BOX_REFINE", "True",
                                                "MODEL.MULTI_SCALE.TWO_STAGE", "True")
    return small_deformable_config(*opts)


def offsets_off_the_cell_borders(model, seed=0):
    """Move every initial sampling offset (whole pixels: encoder locations on cell borders,
    where the gradient to a location is one-sided and the side depends on the coordinate's
    last bit, which the two paths round differently) by 0.2-0.8 pixel."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                bias = module.sampling_offsets.bias
                bias.add_(0.2 + 0.6 * torch.rand(bias.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def deformable_model(deformable_config):
    torch.manual_seed(0)
    return offsets_off_the_cell_borders(build_model(deformable_config))


def images(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=generator),
            torch.randint(0, 256, (3, 72, 100), dtype=torch.uint8, generator=generator)]


def test_accelerate_reaches_every_part_of_deformable_detr(deformable_config, deformable_model):
    """The backbone (folded norms, prepacked), every deformable attention; the parameter and
    buffer names of the plain model."""
    model = deformable_model
    assert isinstance(model.backbone, FastMaskedBackbone) and model.backbone.prepacked
    attentions = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    assert len(attentions) == 3 and all(isinstance(m, FastMultiScaleDeformableAttention) for m in attentions)
    assert list(model.state_dict()) == list(DeformableDetr(deformable_config).state_dict())


def test_multi_level_backbone_runs_the_prepacked_resnet(deformable_model):
    """levels_and_masks (res3, res4, res5 of the padded batch) goes through the prepacked
    oneDNN body at inference and gives the plain body's levels."""
    model = deformable_model.eval()
    tensor = model.preprocess_image([{"image": image} for image in images()]).tensor
    sizes = [tuple(image.shape[1:]) for image in images()]
    levels = {}
    for fast in (False, True):
        set_fast_paths(model, fast)
        with torch.no_grad():
            levels[fast] = model.backbone.levels_and_masks(tensor, sizes, model.in_features)
    stem = model.backbone.body.stem.conv1
    assert isinstance(stem, FrozenNormConv2d) and stem._folded[0][0] == ("oneDNN", tuple(tensor.shape), torch.float32)
    for fast_level, plain_level in zip(levels[True][0], levels[False][0]):
        torch.testing.assert_close(fast_level, plain_level, atol=1e-4, rtol=1e-4)
    for fast_mask, plain_mask in zip(levels[True][1], levels[False][1]):
        assert torch.equal(fast_mask, plain_mask)


def test_detections_equal_the_plain_path(deformable_model):
    model = deformable_model.eval()
    outputs = {}
    for fast in (False, True):
        set_fast_paths(model, fast)
        with torch.no_grad():
            outputs[fast] = [out["instances"] for out in model([{"image": image} for image in images()])]
    for fast, plain in zip(outputs[True], outputs[False]):
        assert torch.equal(fast.pred_classes, plain.pred_classes)
        torch.testing.assert_close(fast.scores, plain.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(fast.pred_boxes.tensor, plain.pred_boxes.tensor, atol=1e-4 * 128, rtol=0)


def test_initial_offsets_on_cell_borders_give_the_plain_losses(deformable_config):
    """With the initial (whole-pixel) offsets the losses are the plain path's; only the
    one-sided gradients of locations exactly on cell borders may differ."""
    torch.manual_seed(0)
    model = build_model(deformable_config).train()
    losses = {}
    for fast in (False, True):
        set_fast_paths(model, fast)
        with EventStorage(0):
            losses[fast] = model(training_batch())
    for name, value in losses[False].items():
        assert_close_to_scale(losses[True][name], value, msg=name)


def training_batch():
    torch.manual_seed(3)
    return [training_input(96, 128, [[5, 5, 60, 70], [70, 20, 120, 90]], [0, 2]),
            training_input(72, 100, [[3, 4, 50, 60]], [1])]


def test_training_losses_and_gradients_equal_the_plain_path(deformable_model):
    model = deformable_model.train()
    batch = training_batch()
    results = {}
    try:
        for fast in (False, True):
            set_fast_paths(model, fast)
            with EventStorage(0):
                losses = model(batch)
            model.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            results[fast] = (losses, {name: p.grad.clone() for name, p in model.named_parameters()
                                      if p.grad is not None})
    finally:
        model.zero_grad(set_to_none=True)
        set_fast_paths(model, True)
        model.eval()
    (plain_losses, plain_grads), (fast_losses, fast_grads) = results[False], results[True]
    for name, value in plain_losses.items():
        assert_close_to_scale(fast_losses[name], value, msg=name)
    assert set(fast_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        assert_close_to_scale(fast_grads[name], grad, msg=name)
