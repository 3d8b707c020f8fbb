import numpy as np
import pytest
from scipy import ndimage

from cmdfed.errors import CmdfedError
from cmdfed.inference.nuclei import nucleus_records
from cmdfed.inference.postprocess import (
    WatershedParams,
    _filled_holes,
    _large_components,
    hover_watershed,
    postprocess,
)
from cmdfed.model.targets import make_targets


def two_touching_discs(shape=(64, 72), centres=((32, 24), (32, 45)), radius=12) -> np.ndarray:
    """Two overlapping discs, each pixel given to the nearer centre (ids 5 and 11)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    distances = np.stack([np.hypot(rows - r, cols - c) for r, c in centres])
    instance_map = np.where(distances.argmin(axis=0) == 0, 5, 11)
    return np.where(distances.min(axis=0) <= radius, instance_map, 0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def best_iou_per_truth(truth: np.ndarray, predicted: np.ndarray) -> list[float]:
    predicted_ids = np.unique(predicted[predicted > 0])
    return [max(iou(truth == t, predicted == p) for p in predicted_ids) for t in np.unique(truth[truth > 0])]


def test_perfect_np_hv_of_two_touching_discs_gives_two_instances():
    truth = two_touching_discs()
    targets = make_targets(truth)
    instances = hover_watershed(targets.nuclear_pixels.astype(np.float32), targets.hv)
    assert sorted(np.unique(instances)) == [0, 1, 2]
    assert min(best_iou_per_truth(truth, instances)) > 0.8
    assert instances.dtype == np.int32


def test_two_touching_discs_form_one_foreground_blob():
    # Guards the test above: the instances must come from the HV gradients, not from
    # the foreground falling apart.
    assert ndimage.label(two_touching_discs() > 0)[1] == 1


def test_types_by_majority_vote_ignore_background_class():
    truth = two_touching_discs()
    targets = make_targets(truth)
    scores = np.zeros((3, *truth.shape), dtype=np.float32)
    scores[1][truth == 5] = 1.0  # left disc: class 1
    scores[0][truth == 11] = 1.0  # right disc: mostly argmax background ...
    right_rows = np.nonzero(truth == 11)[0]
    scores[2][(truth == 11) & (np.indices(truth.shape)[0] < np.median(right_rows))] = 2.0
    result = postprocess(targets.nuclear_pixels.astype(np.float32), targets.hv, scores)
    by_type = {nucleus.type: nucleus for nucleus in result.nuclei}
    assert sorted(by_type) == [1, 2]  # ... yet typed 2: class 0 votes are ignored
    assert by_type[1].type_prob == pytest.approx(1.0)
    assert 0.3 < by_type[2].type_prob < 0.6  # share of pixels voting 2, about half
    for nucleus in result.nuclei:
        assert np.all(result.type_map[result.instance_map == nucleus.id] == nucleus.type)
    assert np.all(result.type_map[result.instance_map == 0] == 0)


def test_vote_shares_and_records_on_a_hand_made_map():
    instance_map = np.zeros((6, 8), dtype=np.int64)
    instance_map[1:4, 2:6] = 40  # 3 rows x 4 columns
    instance_map[5, 0] = 3
    pixel_types = np.zeros((6, 8), dtype=np.int64)
    pixel_types[1:4, 2:6] = [[2, 2, 1, 1], [2, 2, 1, 1], [0, 0, 0, 0]]  # 1 and 2: 4 votes each
    records = nucleus_records(instance_map, pixel_types)
    assert [record.id for record in records] == [3, 40]
    single_pixel, block = records
    assert (single_pixel.type, single_pixel.type_prob) == (0, 1.0)  # only background votes
    assert block.type == 1  # tie between 1 and 2 goes to the smaller id
    assert block.type_prob == pytest.approx(4 / 12)
    assert block.area == 12
    assert block.centroid_xy == pytest.approx((3.5, 2.0))
    assert block.bbox_xyxy == (2, 1, 6, 4)
    contour = block.contour_xy
    np.testing.assert_array_equal(contour[0], contour[-1])
    assert contour[:, 0].min() == 1.5 and contour[:, 0].max() == 5.5
    assert contour[:, 1].min() == 0.5 and contour[:, 1].max() == 3.5
    # Level-0.5 polygon of a 4 x 3 block: the 4 x 3 box with its corners cut by
    # 0.5 x 0.5 / 2 triangles: 12 - 4 * 0.125.
    x, y = contour[:, 0], contour[:, 1]
    assert abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2 == pytest.approx(11.5)
    assert nucleus_records(instance_map)[1].type is None


def test_empty_prediction_gives_no_instances():
    result = postprocess(np.full((40, 50), 0.1), np.zeros((2, 40, 50)), np.zeros((4, 40, 50)))
    assert not result.instance_map.any() and result.nuclei == []
    assert not result.type_map.any()


@pytest.mark.parametrize("shape", [(37, 53), (5, 7), (1, 1)])
def test_odd_tile_sizes(shape):
    truth = np.zeros(shape, dtype=np.int32)
    if shape[0] > 20:
        truth[:] = two_touching_discs(shape, centres=((0, 50),), radius=10)  # cut by the edge
    targets = make_targets(truth)
    instances = hover_watershed(targets.nuclear_pixels.astype(np.float32), targets.hv)
    assert instances.shape == shape
    expected_count = 1 if truth.any() else 0
    assert len(np.unique(instances[instances > 0])) == expected_count
    if truth.any():
        assert iou(instances > 0, truth > 0) > 0.8


def test_filled_holes_and_components_match_scipys_definitions():
    """The OpenCV steps against the SciPy calls HoVer-Net makes: binary_fill_holes, and
    label (4-connectivity) with components under the minimum size dropped."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = ndimage.binary_opening(rng.random(rng.integers(3, 40, 2)) < 0.6)
        np.testing.assert_array_equal(_filled_holes(mask), ndimage.binary_fill_holes(mask))
        components = _large_components(mask, min_size=4)
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        expected = mask & (sizes[labels] >= 4)
        np.testing.assert_array_equal(components > 0, expected)
        assert sorted(np.unique(components[components > 0])) == list(range(1, len(np.unique(labels[expected])) + 1))
        for part in np.unique(components[components > 0]):  # each is one whole SciPy component
            assert len(np.unique(labels[components == part])) == 1
            assert (labels == labels[components == part][0]).sum() == (components == part).sum()


@pytest.mark.parametrize(
    "settings",
    [{"sobel_kernel_size": 20}, {"sobel_kernel_size": 33}, {"foreground_threshold": 0.0}],
)
def test_bad_parameters_raise(settings):
    with pytest.raises(CmdfedError):
        WatershedParams(**settings)


def test_mismatched_shapes_raise():
    with pytest.raises(CmdfedError):
        hover_watershed(np.zeros((8, 8)), np.zeros((8, 8, 2)))
    with pytest.raises(CmdfedError):
        postprocess(np.zeros((8, 8)), np.zeros((2, 8, 8)), np.zeros((3, 8, 9)))


def test_settings_scale_from_hovernets_40x_to_the_image_resolution():
    assert (
        WatershedParams.for_mpp(0.25)
        == WatershedParams()
        == WatershedParams.for_mpp(None)
        == WatershedParams.for_mpp(float("nan"))
    )
    at_20x = WatershedParams.for_mpp(0.5)
    # the values that raise PQ on perfect 20x maps from 0.68 to 0.89 (see WatershedParams)
    assert (at_20x.sobel_kernel_size, at_20x.marker_opening_size, at_20x.min_object_size) == (11, 3, 3)
    assert at_20x.foreground_threshold == 0.5 and at_20x.marker_gradient_threshold == 0.4
    assert WatershedParams.for_mpp(0.1).sobel_kernel_size == 31  # clipped to the valid aperture range
    assert WatershedParams.for_mpp(0.5, sobel_kernel_size=7).sobel_kernel_size == 7


def test_settings_round_trip_through_a_dict_and_a_manifest():
    params = WatershedParams.for_mpp(0.5, foreground_threshold=0.6)
    assert WatershedParams.from_dict(params.to_dict()) == params
    manifest = {"postprocessing": {"params": params.to_dict()}}
    assert WatershedParams.from_manifest(manifest) == params
    with pytest.raises(CmdfedError, match="unknown post-processing setting.*sobel_size"):
        WatershedParams.from_dict({**params.to_dict(), "sobel_size": 3})
