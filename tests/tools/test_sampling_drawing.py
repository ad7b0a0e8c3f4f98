"""detr_d2.utils.sampling_drawing on hand-made sampling points: each point is drawn where it
lies, in its level's colour, opaque and large in proportion to its weight; --levels."""
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from detr_d2.analysis import ImageSampling
from detr_d2.errors import SetupError
from detr_d2.utils.panel_grid import CAPTION_HEIGHT, GAP
from detr_d2.utils.sampling_drawing import (
    GREY_BRIGHTNESS,
    LEVEL_COLOURS,
    MIN_OPACITY,
    check_levels,
    parse_levels,
    sampling_grid,
)

SIDE = 128  # pixels of the image
PANEL = 256  # pixels of a panel: points scale by 2
GREY = 150  # of the image


def _sampling():
    """One query, one head, two levels with one point each: level 0 at (30, 40) with weight
    0.8, level 1 at (100, 20) with 0.2; reference box centred at (100, 100). The encoder
    positions sample the same way."""
    locations = torch.tensor([[[[[30.0, 40.0]], [[100.0, 20.0]]]]])
    weights = torch.tensor([[[[0.8], [0.2]]]])
    positions = 16 * 16 + 8 * 8
    return ImageSampling(
        decoder_locations=locations, decoder_weights=weights, decoder_references=torch.tensor([[100.0, 100.0, 20, 20]]),
        encoder_locations=locations.expand(positions, -1, -1, -1, -1),
        encoder_weights=weights.expand(positions, -1, -1, -1),
        encoder_references=torch.tensor([[60.0, 100.0]]).expand(positions, -1),
        spatial_shapes=torch.tensor([[16, 16], [8, 8]]), valid_cells=torch.tensor([[16, 16], [8, 8]]),
        input_size=(SIDE, SIDE), output_size=(SIDE, SIDE))


def _detection_panel(levels=None):
    """The third panel of the first row (after the overview and the legend): detection 0's."""
    image = np.full((SIDE, SIDE, 3), GREY, np.uint8)
    instances = Instances((SIDE, SIDE), pred_boxes=Boxes(torch.tensor([[90.0, 90.0, 110.0, 110.0]])),
                          scores=torch.tensor([0.9]), pred_classes=torch.tensor([0]))
    grid = sampling_grid(image, instances, torch.tensor([0]), torch.tensor([0]), _sampling(), [(10.0, 10.0)],
                         ["thing"], panel_side=PANEL, levels=levels)
    top, left = GAP + CAPTION_HEIGHT, GAP + 2 * (PANEL + GAP)
    return grid[top:top + PANEL, left:left + PANEL].astype(np.float64)


def test_points_are_drawn_where_they_lie_in_their_levels_colour_by_weight():
    panel = _detection_panel()
    background = GREY * GREY_BRIGHTNESS
    assert np.allclose(panel[5, 5], background, atol=1)
    # the heaviest point: opaque, in level 0's colour, at twice its image position
    assert np.allclose(panel[80, 60], LEVEL_COLOURS[0], atol=1)
    # the other: a quarter of the heaviest's weight -> opacity MIN + (1 - MIN) / 4
    opacity = MIN_OPACITY + (1 - MIN_OPACITY) * 0.25
    assert np.allclose(panel[40, 200], background * (1 - opacity) + np.array(LEVEL_COLOURS[1]) * opacity, atol=1)
    # and half the radius (area in proportion to weight)
    heavy = np.all(np.abs(panel - LEVEL_COLOURS[0]) < 2, axis=-1).sum()
    light_colour = background * (1 - opacity) + np.array(LEVEL_COLOURS[1]) * opacity
    light = np.all(np.abs(panel - light_colour) < 2, axis=-1).sum()
    assert 2.5 < heavy / light < 5.5


def test_levels_not_chosen_are_not_drawn():
    panel = _detection_panel(levels=[1])
    assert np.allclose(panel[80, 60], GREY * GREY_BRIGHTNESS, atol=1)
    assert not np.allclose(panel[40, 200], GREY * GREY_BRIGHTNESS, atol=1)


def test_levels_flag_parses_and_is_checked_against_the_model():
    assert parse_levels("2, 0,2") == [0, 2]
    for text in ("", "a", "1;2", "-1", "0,"):
        with pytest.raises(SetupError, match="--levels"):
            parse_levels(text)
    check_levels([0, 3], 4, "Dino")
    with pytest.raises(SetupError, match=r"4 feature levels \(0 to 3.*not level 4"):
        check_levels([0, 4], 4, "Dino")
    with pytest.raises(SetupError, match="Detr reads one feature map"):
        check_levels([0], None, "Detr")
