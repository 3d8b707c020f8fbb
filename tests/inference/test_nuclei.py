"""Nuclei records in tile pixels, and their image coordinates and GeoJSON features."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours

from cmdfed.inference.nuclei import PIXEL_CENTRE, LabelIndex, image_xy, nucleus_feature, nucleus_records


def square_nucleus() -> np.ndarray:
    instances = np.zeros((16, 16), np.int32)
    instances[4:7, 10:13] = 7  # rows 4..6, columns 10..12
    return instances


def test_records_are_in_tile_pixels_with_centres_on_integers():
    (nucleus,) = nucleus_records(square_nucleus())
    assert nucleus.id == 7 and nucleus.area == 9
    assert nucleus.centroid_xy == (11.0, 5.0)
    xs, ys = nucleus.contour_xy[:, 0], nucleus.contour_xy[:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (9.5, 12.5, 3.5, 6.5)
    assert np.array_equal(nucleus.contour_xy[0], nucleus.contour_xy[-1])


def corner_points(polygon: np.ndarray) -> set[tuple[float, float]]:
    """The points of a closed polygon where it turns (collinear points dropped)."""
    points = polygon[:-1]
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    turn = (points - before)[:, 0] * (after - points)[:, 1] - (points - before)[:, 1] * (after - points)[:, 0]
    return {tuple(point) for point in points[np.abs(turn) > 1e-9]}


def signed_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


def test_contours_are_the_level_half_line_that_skimage_traces():
    """Random nucleus-like shapes (4-connected, with dents, holes and diagonal contacts): the
    polygon is find_contours' level-0.5 line, diagonal neighbours joined, wound the same way,
    with its corners only."""
    rng = np.random.default_rng(0)
    for trial in range(400):
        mask = rng.random(rng.integers(1, 16, 2)) < rng.uniform(0.3, 0.9)
        if trial % 2:
            mask = ndimage.binary_closing(mask)
        parts = ndimage.label(mask)[0]
        if not parts.any():
            continue
        mask = parts == np.bincount(parts.ravel())[1:].argmax() + 1
        instances = np.where(mask, 3, 0)
        (nucleus,) = nucleus_records(instances)
        contour = nucleus.contour_xy
        framed = np.pad(mask.astype(float), 1)
        reference = max(find_contours(framed, 0.5, fully_connected="high"), key=len)[:, ::-1] - 1.0
        assert np.array_equal(contour[0], contour[-1])
        assert corner_points(contour) == corner_points(reference)
        assert len(contour) - 1 == len(corner_points(contour))
        assert signed_area(contour) == signed_area(reference)


def test_image_coordinates_shift_points_by_the_corner_and_half_a_pixel():
    assert PIXEL_CENTRE == 0.5
    np.testing.assert_array_equal(image_xy((11.0, 5.0), (100, 200)), [111.5, 205.5])
    np.testing.assert_array_equal(image_xy([[0.0, 0.0], [1.0, 2.0]]), [[0.5, 0.5], [1.5, 2.5]])


def test_geojson_feature_places_the_polygon_in_slide_coordinates():
    (nucleus,) = nucleus_records(square_nucleus())
    feature = nucleus_feature(nucleus, (100, 200), 3, ["background", "tumour"], mpp=0.5)
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert (ring[:, 0].min(), ring[:, 0].max(), ring[:, 1].min(), ring[:, 1].max()) == (110.0, 113.0, 204.0, 207.0)
    props = feature["properties"]
    assert props["nucleus_id"] == 3 and props["classification"]["name"] == "Nucleus"
    assert props["measurements"] == {"Area px^2": 9, "Area um^2": 2.25}


def test_label_index_of_dense_and_sparse_ids_agree():
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 6, size=(32, 48)).astype(np.int32)
    dense[dense == 3] = 0  # an id that does not occur
    sparse = np.where(dense > 0, dense.astype(np.int64) * 10**9, 0)  # ids far above the pixel count
    for labels, ids in (
        (LabelIndex.of(dense), [1, 2, 4, 5]),
        (LabelIndex.of(sparse), [10**9, 2 * 10**9, 4 * 10**9, 5 * 10**9]),
    ):
        assert labels.ids.tolist() == ids
        assert labels.areas.tolist() == [int((dense == i).sum()) for i in (1, 2, 4, 5)]
        rows = labels.pixel_rows.reshape(dense.shape)
        assert (rows[dense == 0] == -1).all() and (rows[dense == 4] == 2).all()
