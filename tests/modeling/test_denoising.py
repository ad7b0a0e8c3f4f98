"""DINO's contrastive denoising queries: groups, attention mask, positives and negatives,
label and box noise within their bounds; a Dino's matching queries do not see them, and
inference runs without them."""
import pytest
import torch
from torchvision.ops import box_convert

from detr_d2.modeling.multi_scale.denoising import (denoising_attention_mask, make_denoising_queries,
                                                    number_of_groups, positive_query_indices)
from tests.helpers import padded_image_batch, tiny_model

NUM_CLASSES = 7
NUM_QUERIES = 5  # of the attention masks built here


def targets_of(counts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for count in counts:
        centres = torch.rand(count, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.1
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (count,), generator=generator),
                        "boxes": torch.cat([centres, sizes], 1)})
    return targets


def queries(targets, dn_number=10, label_noise=0.5, box_noise=0.4, seed=0, embedding=None):
    torch.manual_seed(seed)
    embedding = embedding or torch.nn.Embedding(NUM_CLASSES + 1, 16)
    return make_denoising_queries(targets, embedding, NUM_QUERIES, NUM_CLASSES, dn_number, label_noise, box_noise,
                                  generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dn_number, largest, groups", [(100, 3, 33), (100, 60, 1), (100, 0, 1), (10, 3, 20),
                                                        (10, 40, 20), (0, 2, 1)])
def test_number_of_groups_follows_the_reference_rule(dn_number, largest, groups):
    assert number_of_groups(dn_number, largest) == groups


def test_layout_pads_each_group_to_twice_the_largest_target_count():
    dn = queries(targets_of([3, 1]))
    assert dn.num_groups == 20
    assert dn.pad_size == 20 * 2 * 3
    assert dn.content.shape == (2, dn.pad_size, 16) and dn.boxes.shape == (2, dn.pad_size, 4)
    # image 1 has one target: its slots 1 and 2 of every half stay empty (zero)
    empty = torch.tensor([s for g in range(2 * dn.num_groups) for s in (g * 3 + 1, g * 3 + 2)])
    assert torch.equal(dn.content[1, empty], torch.zeros(len(empty), 16))
    assert dn.content[1, ::3].abs().sum(1).gt(0).all()


def test_attention_mask_blocks_matching_from_denoising_and_groups_from_each_other():
    pad, groups = 12, 3
    mask = denoising_attention_mask(pad, groups, NUM_QUERIES)
    assert mask.shape == (pad + NUM_QUERIES, pad + NUM_QUERIES) and mask.dtype == torch.bool
    assert mask[pad:, :pad].all(), "matching queries must not see denoising queries"
    assert not mask[pad:, pad:].any(), "matching queries see each other"
    assert not mask[:pad, pad:].any(), "denoising queries see the matching ones"
    group = torch.arange(pad) // (pad // groups)
    assert torch.equal(mask[:pad, :pad], group[:, None] != group[None, :])


def test_positive_indices_point_at_the_first_half_of_each_group():
    targets = targets_of([3, 1])
    dn = queries(targets)
    for (query_index, target_index), target in zip(positive_query_indices(targets, dn.num_groups, dn.pad_size),
                                                  targets):
        assert len(query_index) == dn.num_groups * len(target["labels"])
        within_group = query_index % (dn.pad_size // dn.num_groups)
        assert (within_group < 3).all(), "positives sit in the first half of their group"
        assert torch.equal(within_group, target_index)


def corners(boxes):
    return box_convert(boxes, "cxcywh", "xyxy")


def test_box_noise_moves_positives_less_than_negatives_within_bounds():
    targets = targets_of([4, 2], seed=1)
    scale = 0.4
    dn = queries(targets, dn_number=50, label_noise=0.0, box_noise=scale)
    half_group = dn.pad_size // dn.num_groups // 2
    for image, target in enumerate(targets):
        count = len(target["labels"])
        true_corners = corners(target["boxes"])
        half = torch.cat([target["boxes"][:, 2:], target["boxes"][:, 2:]], 1) / 2
        for group in range(dn.num_groups):
            start = group * 2 * half_group
            for offset, low, high in ((0, 0.0, 1.0), (half_group, 1.0, 2.0)):
                noised = corners(dn.boxes[image, start + offset:start + offset + count].sigmoid())
                moved = (noised - true_corners).abs() / (half * scale)
                clamped = (noised <= 1e-4) | (noised >= 1 - 1e-4)
                assert (moved[~clamped] < high + 1e-3).all()
                assert (moved[~clamped] >= low - 1e-3).all()


def test_label_noise_flips_about_half_the_ratio_to_valid_classes():
    targets = targets_of([30, 30], seed=2)
    embedding = torch.nn.Embedding(NUM_CLASSES + 1, 16)
    dn = queries(targets, dn_number=40, label_noise=0.5, embedding=embedding)
    rows = embedding.weight.detach()
    decoded, expected = [], []
    for image, target in enumerate(targets):
        for copy in range(2 * dn.num_groups):
            content = dn.content[image, copy * 30:copy * 30 + 30].detach()
            decoded.append(torch.cdist(content, rows).argmin(1))
            expected.append(target["labels"])
    decoded, expected = torch.cat(decoded), torch.cat(expected)
    assert decoded.max() < NUM_CLASSES
    changed = (decoded != expected).float().mean().item()
    # a label is redrawn with probability 0.25 and then lands on another class 6 times in 7
    assert abs(changed - 0.25 * 6 / 7) < 0.03, changed


@pytest.fixture(scope="module")
def dino():
    model = tiny_model("MODEL.META_ARCHITECTURE", "Dino", "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']",
                       "MODEL.DETR.DEC_LAYERS", 2, "MODEL.DETR.NUM_CLASSES", NUM_CLASSES,
                       "MODEL.MULTI_SCALE.TOPK_DETECTIONS", 20, "MODEL.DINO.DN_NUMBER", 5)
    return model.eval()


def test_matching_queries_do_not_see_denoising_queries(dino):
    images = padded_image_batch(dino)
    targets = targets_of([3, 2])
    with torch.no_grad():
        logits, boxes, extras = dino.predict(images)
        dn = dino.denoising_queries(targets, generator=torch.Generator().manual_seed(0))
        logits_dn, boxes_dn, extras_dn = dino.predict(images, dn)
    assert extras.dn_logits is None
    assert extras_dn.dn_logits.shape[2] == dn.pad_size
    torch.testing.assert_close(logits_dn, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes_dn, boxes, atol=1e-5, rtol=0)


def test_inference_runs_the_matching_queries_alone(dino):
    images = padded_image_batch(dino)
    with torch.no_grad():
        logits, _, _ = dino.predict(images)
        results = dino([{"image": torch.randint(0, 255, (3, 128, 96), dtype=torch.uint8)}])
    assert logits.shape[2] == len(dino.transformer.tgt_embed.weight)
    assert len(results[0]["instances"]) == 20
