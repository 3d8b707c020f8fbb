"""Nuclei records in tile pixels, and their image coordinates and GeoJSON features."""

from __future__ import annotations

import numpy as np

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
