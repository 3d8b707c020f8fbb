"""Macenko stain normalisation on real H&E (CPM-15): the method's arithmetic, stains moved and
nothing else, and the product's path (a checkpoint's reference,
`segment_image`) giving a re-stained image the nuclei of the original."""

import numpy as np
import pytest
import torch

from cmdfed.data import cpm15
from cmdfed.errors import CmdfedError
from cmdfed.evaluate.metrics import evaluate_instances
from cmdfed.inference.postprocess import WatershedParams
from cmdfed.inference.segment import load_model, segment_image
from cmdfed.inference.stain import MIN_STAINED_PIXELS, HEStains, macenko, normalised, source_stains


@pytest.fixture(scope="module")
def images():
    return {image_id: cpm15.load_pair(image_id, 0.5)[0] for image_id in ("01", "02", "08", "10")}


def _restained(image: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``image`` as if stained like ``other``: its own stain amounts in the other's stains."""
    return macenko(image, HEStains.of([image]), HEStains.of([other]))


def test_the_affine_form_equals_macenko_s_unmix_scale_and_remix(images):
    """``macenko`` folds the method into one OD-space matrix and table lookups; the method written
    out step by step in float64 (as its reference implementation is) gives the same image."""
    reference, image = HEStains.of([images["01"]]), images["10"]
    source = HEStains.of([image])
    density = -np.log((image.reshape(-1, 3).astype(np.float64) + 1) / 240)
    concentrations = np.linalg.lstsq(source.vectors, density.T, rcond=None)[0]
    concentrations *= (np.array(reference.max_concentrations) / source.max_concentrations)[:, None]
    expected = np.minimum(240 * np.exp(-reference.vectors @ concentrations), 255).T.reshape(image.shape)
    difference = np.abs(macenko(image, source, reference).astype(float) - expected)
    assert difference.max() <= 1.0  # the uint8 rounding, nothing more


def test_an_image_re_stained_as_a_reference_takes_its_stains(images):
    reference = HEStains.of([images["01"], images["02"]])
    source = HEStains.of([images["10"]])
    moved = HEStains.of([macenko(images["10"], source, reference)])

    def apart(a: HEStains, b: HEStains) -> float:  # the largest angle between their stain vectors, degrees
        cosines = np.sum(a.vectors * b.vectors, axis=0)
        return float(np.degrees(np.arccos(np.clip(cosines, -1, 1))).max())

    assert apart(source, reference) > 5 and apart(moved, reference) < apart(source, reference) / 2
    # Re-estimated on the re-stained image (whose vectors differ a little), the maxima come back within 10 %.
    np.testing.assert_allclose(moved.max_concentrations, reference.max_concentrations, rtol=0.1)


def test_an_image_re_stained_as_its_own_stains_barely_changes(images):
    """What changes is what two stains cannot express: optical density off their plane, and light
    above Io (240), which Macenko's model caps (image 10 has little glass)."""
    own = HEStains.of([images["10"]])
    difference = np.abs(macenko(images["10"], own, own).astype(int) - images["10"].astype(int))
    assert difference.mean() < 2.5 and np.percentile(difference, 99) <= 10


def test_one_tissue_stained_two_ways_comes_back_to_nearly_one_image(images):
    """What normalisation is for: the same tissue from two labs looks alike to the model."""
    reference = HEStains.of([images["01"]])
    original = images["08"]
    restained = _restained(original, images["10"])
    before = np.abs(original.astype(int) - restained.astype(int)).mean()
    after = np.abs(normalised(original, reference).astype(int) - normalised(restained, reference).astype(int)).mean()
    assert before > 10 and after < before / 2.5, (before, after)  # measured: 19.4 -> 6.0 levels


def test_too_little_stain_to_estimate_leaves_an_image_as_it_is(images):
    reference = HEStains.of([images["01"]])
    blank = np.full((64, 64, 3), 255, np.uint8)
    with pytest.raises(CmdfedError, match="too little stain to estimate H&E on"):
        HEStains.of([blank])
    assert source_stains([blank]) is None and normalised(blank, reference) is blank
    speck = images["10"][:16, :16]
    assert speck.shape[0] * speck.shape[1] < MIN_STAINED_PIXELS and normalised(speck, reference) is speck
    with pytest.raises(CmdfedError, match="uint8 RGB"):
        HEStains.of([np.zeros((64, 64), np.uint8)])


def test_a_recorded_reference_round_trips_and_a_damaged_one_is_named(images):
    stains = HEStains.of([images["01"]])
    again = HEStains.from_dict(stains.to_dict(), "x")
    np.testing.assert_allclose(again.vectors, stains.vectors, atol=1e-6)
    with pytest.raises(CmdfedError, match="config.json: stain_reference is damaged"):
        HEStains.from_dict({"method": "macenko", "hematoxylin": [1, 2, 3]}, "config.json")
    with pytest.raises(CmdfedError, match="damaged.*not macenko"):
        HEStains.from_dict({**stains.to_dict(), "method": "reinhard"}, "config.json")
    with pytest.raises(CmdfedError, match="two positive maxima"):
        HEStains.from_dict({**stains.to_dict(), "max_concentrations": [1.0, 0.0]}, "config.json")
    assert HEStains.from_manifest({"preprocessing": {"tile_size": 256}}) is None  # a bundle from before references


def test_a_restained_image_gives_the_original_s_nuclei_once_normalised(images):
    """The released dev model (its checkpoint records CPM-15 01-07's stains) on image 08 and on 08
    re-stained as 10: normalised, the two are segmented from nearly one image, so their nuclei
    agree far better than as scanned."""
    cpu = torch.device("cpu")
    original = images["08"][:384, :384]
    restained = _restained(original, images["10"])
    params = WatershedParams.for_mpp(0.5)
    agreement = {}
    for normalise in (False, True):
        loaded = load_model("cmd-tiny-he-nuclei-dev", cpu, stain_normalise=normalise)
        assert (loaded.stain_reference is not None) == normalise
        first, second = (segment_image(loaded, image, params).instance_map for image in (original, restained))
        agreement[normalise] = evaluate_instances(first, second)["pq"]
    assert agreement[True] >= 0.85 and agreement[True] > agreement[False] + 0.05, agreement
