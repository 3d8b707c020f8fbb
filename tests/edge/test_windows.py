"""Large tiles in model-sized windows: which window side computes the fewest pixels."""

from __future__ import annotations

from edge.windows import cheapest_window


def test_half_the_bundle_tile_is_used_where_it_computes_fewer_pixels():
    assert cheapest_window(1024, 1024, 512, 64, 32) == 256  # 25 windows of 256 px (1.6 Mpx) against 9 of 512 (2.4 Mpx)
    assert cheapest_window(2048, 2048, 512, 64, 32) == 512  # 25 of 512 (6.6 Mpx) against 121 of 256 (7.9 Mpx)
    assert cheapest_window(768, 768, 512, 64, 32) == 512  # 4 of 512 or 16 of 256: the same pixels, the bundle's tile
    assert cheapest_window(1024, 600, 512, 64, 32) == 256  # 5 x 3 of 256 px (1.0 Mpx) against 3 x 2 of 512 (1.6 Mpx)


def test_half_a_tile_must_stay_a_multiple_of_the_network_and_wider_than_the_overlap():
    assert cheapest_window(1024, 1024, 96, 32, 32) == 96  # 48 is no multiple of 32
    assert cheapest_window(1024, 1024, 128, 64, 32) == 128  # 64 leaves no pixel beside the overlap
