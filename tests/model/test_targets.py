import numpy as np
import pytest

from cmdfed.errors import CmdfedError
from cmdfed.model.targets import horizontal_vertical_map, make_targets


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_disc_hv_is_offset_from_centre_scaled_per_side_over_whole_instance():
    instance_map = np.where(disc((9, 9), (4, 4), 3), 7, 0)
    hv = horizontal_vertical_map(instance_map)
    third = 1 / 3
    # Middle row spans columns 1..7 around the centre column 4.
    np.testing.assert_allclose(hv[0, 4, 1:8], [-1, -2 * third, -third, 0, third, 2 * third, 1])
    # Row 2 is narrower (columns 2..6), but the scale is still the instance's widest
    # reach of 3 columns, so its ends are -2/3 and +2/3, not -1 and +1.
    np.testing.assert_allclose(hv[0, 2, 2:7], [-2 * third, -third, 0, third, 2 * third])
    # The vertical map of a symmetric disc is the horizontal one transposed.
    np.testing.assert_allclose(hv[1], hv[0].T)
    assert hv.dtype == np.float32 and hv.shape == (2, 9, 9)
    assert np.all(hv[:, instance_map == 0] == 0)


def test_lopsided_bar_rounds_centre_half_up_and_scales_each_side_separately():
    instance_map = np.array([[0, 4, 4, 4, 4, 0]])  # columns 1..4, mean 2.5 -> centre 3
    hv = horizontal_vertical_map(instance_map)
    np.testing.assert_allclose(hv[0, 0], [0, -1, -0.5, 0, 1, 0])
    np.testing.assert_allclose(hv[1, 0], 0)  # a single row has no vertical extent


def test_touching_instances_with_arbitrary_ids_jump_from_plus_one_to_minus_one():
    instance_map = np.array([[3, 3, 3, 70000, 70000, 70000]])
    hv = horizontal_vertical_map(instance_map)
    np.testing.assert_allclose(hv[0, 0], [-1, 0, 1, -1, 0, 1])


def test_tile_without_background_is_one_instance():
    np.testing.assert_allclose(horizontal_vertical_map(np.full((1, 3), 5))[0, 0], [-1, 0, 1])


def test_np_and_nc_targets():
    instance_map = np.array([[0, 2, 2], [0, 9, 9]])
    type_map = np.array([[3, 1, 1], [3, 2, 2]])  # type 3 on background must not leak into NC
    targets = make_targets(instance_map, type_map)
    np.testing.assert_array_equal(targets.nuclear_pixels, [[0, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(targets.nuclear_types, [[0, 1, 1], [0, 2, 2]])
    assert make_targets(instance_map).nuclear_types is None


def test_empty_tile_gives_zero_targets():
    targets = make_targets(np.zeros((4, 5), dtype=np.int32))
    assert not targets.nuclear_pixels.any() and not targets.hv.any()


@pytest.mark.parametrize(
    "instance_map, type_map",
    [
        (np.zeros((3, 3), dtype=np.float32), None),
        (np.array([[0, -1]]), None),
        (np.zeros((2, 2, 2), dtype=int), None),
        (np.zeros((3, 3), dtype=int), np.zeros((3, 4), dtype=int)),
    ],
)
def test_bad_maps_raise_cmdfed_error(instance_map, type_map):
    with pytest.raises(CmdfedError):
        make_targets(instance_map, type_map)
