"""Images at another resolution than the model's are segmented at the model's and the nuclei
come back in the image's own pixels."""

import numpy as np
import torch

from cmdfed.data import cpm15
from cmdfed.evaluate.metrics import evaluate_instances
from cmdfed.inference.postprocess import postprocess_for
from cmdfed.inference.segment import load_model, segment_image
from cmdfed.inference.tiling import needs_resampling, resize_labels

CPU = torch.device("cpu")


def test_nearest_resize_keeps_ids_whole_and_places_them():
    labels = np.zeros((4, 6), np.int32)
    labels[1:3, 2:4] = 7
    up = resize_labels(labels, (8, 12))
    assert set(np.unique(up)) == {0, 7} and (up == 7).sum() == 16
    assert np.array_equal(np.argwhere(up == 7).min(0), [2, 4])  # the block doubled in place
    assert np.array_equal(resize_labels(up, (4, 6)), labels)


def test_resampling_only_when_the_resolutions_differ():
    assert needs_resampling(0.25, 0.5) and needs_resampling(1.0, 0.5)
    assert not needs_resampling(0.499, 0.5) and not needs_resampling(None, 0.5) and not needs_resampling(0.25, None)


def test_a_40x_image_gives_the_nuclei_of_the_same_image_at_20x():
    """CPM-15 image 08 as scanned (40x) and resized to 20x, through the released nuclei model:
    the same nuclei (IoU-matched), in the 40x image's coordinates."""
    loaded = load_model("cmd-tiny-he-nuclei", CPU)
    assert loaded.mpp == 0.5
    params, _ = postprocess_for(loaded.checkpoint, loaded.mpp)
    native, truth_40x = cpm15.load_pair("08", None)
    at_20x, _ = cpm15.load_pair("08", 0.5)
    from_40x = segment_image(loaded, native, params, image_mpp=0.25)
    from_20x = segment_image(loaded, at_20x, params, image_mpp=0.5)
    assert from_40x.instance_map.shape == native.shape[:2]
    same = evaluate_instances(resize_labels(from_20x.instance_map, native.shape[:2]), from_40x.instance_map)
    assert same["pq"] >= 0.9 and same["det_f1"] >= 0.9
    # and they are nuclei: most of the expert's 40x nuclei are found, in 40x pixels
    assert evaluate_instances(truth_40x, from_40x.instance_map)["det_f1"] > 0.6
    areas_40x = np.median([n.area for n in from_40x.nuclei])
    areas_20x = np.median([n.area for n in from_20x.nuclei])
    assert 3.0 < areas_40x / areas_20x < 5.0  # areas in the image's own pixels (4x at twice the resolution)
