import pytest
import torch

from idflux.engine.regions import box_token_range, boxes_to_membership


def test_floor_ceil_rule_and_clipping():
    assert box_token_range((16, 0, 33, 16), 64, 64) == (1, 0, 3, 1)  # ceil(33/16) = 3
    assert box_token_range((15.9, 17, 32, 48), 64, 64) == (0, 1, 2, 3)
    assert box_token_range((-40, -3, 500, 70), 64, 64) == (0, 0, 4, 4)  # clipped to the 4x4 grid


def test_membership_bits_and_layout():
    mem = boxes_to_membership([[(0, 0, 32, 16), (16, 0, 64, 32)], []], 32, 64)
    assert mem.shape == (2, 8) and mem.dtype == torch.int64
    # row-major grid of 2 rows x 4 columns: idx = y * 4 + x
    assert mem[0].tolist() == [1, 3, 2, 2, 0, 2, 2, 2]
    assert mem[1].eq(0).all()


def test_size_not_multiple_of_16():
    with pytest.raises(ValueError, match="multiples of 16"):
        boxes_to_membership([[(0, 0, 8, 8)]], 40, 64)


from idflux.engine.regions import parse_boxes  # noqa: E402


def test_parse_boxes_pixels_and_normalised():
    assert parse_boxes([(0, 0, 32, 32)], 1, 64, 64) == [(0.0, 0.0, 32.0, 32.0)]
    assert parse_boxes([(0, 0, 0.5, 0.25), (0.5, 0.5, 1, 1)], 2, 64, 128) == [(0, 0, 64, 16), (64, 32, 128, 64)]


@pytest.mark.parametrize("boxes,n,match", [
    ([(0, 0, 10, 10)], 2, "one box per reference"),
    ([(5, 5, 5, 20)], 1, "empty"),
    ([(100, 100, 120, 120)], 1, "outside"),
    ([(0, 0, 10)], 1, r"x1, y1, x2, y2"),
    ([(0, 0, 8, 8)] * 5, 5, "at most 4"),
])
def test_parse_boxes_errors(boxes, n, match):
    with pytest.raises(ValueError, match=match):
        parse_boxes(boxes, n, 64, 64)
