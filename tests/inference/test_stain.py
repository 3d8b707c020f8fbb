"""Reinhard stain normalisation on real H&E (CPM-15): statistics moved, nothing else."""

import cv2
import numpy as np
import pytest

from cmdfed.data import cpm15
from cmdfed.errors import CmdfedError
from cmdfed.inference.stain import LabStats, reinhard
from cmdfed.inference.tissue import tissue_mask


@pytest.fixture(scope="module")
def images():
    return {image_id: cpm15.load_pair(image_id, 0.5)[0] for image_id in ("01", "02", "10")}


def _tissue_lab(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)[mask]


def test_an_image_moved_to_a_reference_takes_its_tissue_statistics(images):
    reference = LabStats.of([images["01"], images["02"]])
    source = LabStats.of([images["10"]])
    assert np.abs(np.subtract(source.mean, reference.mean)).max() > 5  # another stain to start with
    moved = reinhard(images["10"], source, reference)
    tissue = _tissue_lab(moved, tissue_mask(images["10"]))  # the same pixels, measured after the move
    np.testing.assert_allclose(tissue.mean(0), reference.mean, atol=1.0)
    np.testing.assert_allclose(tissue.std(0), reference.std, rtol=0.03)


def test_an_image_moved_to_its_own_statistics_is_unchanged(images):
    own = LabStats.of([images["10"]])
    moved = reinhard(images["10"], own, own)
    difference = np.abs(moved.astype(int) - images["10"].astype(int))
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 3  # 8-bit LAB's round trip, no more


def test_a_blank_image_has_no_stain_to_measure():
    with pytest.raises(CmdfedError, match="no tissue to measure stain colours on"):
        LabStats.of([np.full((64, 64, 3), 255, np.uint8)])
    with pytest.raises(CmdfedError, match="uint8 RGB"):
        LabStats.of([np.zeros((64, 64), np.uint8)])
