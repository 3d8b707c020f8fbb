"""Evaluation sees tiles as inference does: re-stained as the model's training images, each
source image's tiles by one estimate of that image's stains."""

import numpy as np
import pytest
import torch

from cmdfed.data import cpm15
from cmdfed.data.store import SiteStore, Tile, create_store
from cmdfed.evaluate.run import ModelTiles, evaluate_checkpoint
from cmdfed.inference.stain import HEStains, macenko


@pytest.fixture(scope="module")
def two_labs(tmp_path_factory):
    """CPM-15 image 08 cut into 128 px tiles twice: as scanned (source '08') and re-stained as
    image 10 ('08-lab-b'), with its labels, in one store."""
    image, labels = cpm15.load_pair("08", 0.5)
    restained = macenko(image, HEStains.of([image]), HEStains.of([cpm15.load_pair("10", 0.5)[0]]))
    path = tmp_path_factory.mktemp("stores") / "two-labs.zarr"
    corners = [(y, x) for y in range(0, image.shape[0] - 127, 128) for x in range(0, image.shape[1] - 127, 128)]
    with create_store(path, tile_size=128, mpp=0.5) as store, store.writer() as writer:
        for source, pixels in (("08", image), ("08-lab-b", restained)):
            for y, x in corners:
                crop = (slice(y, y + 128), slice(x, x + 128))
                writer.add(Tile(image=pixels[crop], instances=labels[crop].astype(np.int32), source=source, mpp=0.5))
    return path, len(corners)


def test_each_source_s_tiles_are_re_stained_by_that_source_s_stains(two_labs):
    path, per_source = two_labs
    site = SiteStore.open(path)
    indices = np.arange(len(site))
    reference = HEStains.of([cpm15.load_pair("01", 0.5)[0]])
    tiles = ModelTiles(site, indices, reference)
    assert set(tiles.stains) == {"08", "08-lab-b"}
    scanned = [site.image(i) for i in indices]
    seen = tiles.images(list(indices))
    gap_scanned = np.mean([np.abs(scanned[i].astype(int) - scanned[i + per_source]).mean() for i in range(per_source)])
    gap_seen = np.mean([np.abs(seen[i].astype(int) - seen[i + per_source]).mean() for i in range(per_source)])
    assert gap_seen < gap_scanned / 2.5, (gap_scanned, gap_seen)  # the two labs' tiles look nearly alike
    as_scanned = ModelTiles(site, indices, None)
    assert not as_scanned.stains and np.array_equal(as_scanned.images([0, 1]), np.stack(scanned[:2]))


def test_evaluation_scores_a_second_lab_s_tiles_nearer_the_first_s_when_normalised(two_labs):
    """The released dev model scores the two labs' copies of one image: as scanned their PQ
    differs (the model learnt 01-07's stains), normalised it nearly agrees."""
    path, per_source = two_labs
    cpu = torch.device("cpu")
    spread = {}
    for normalise in (False, True):
        pq = []
        for lab in (np.arange(per_source), np.arange(per_source, 2 * per_source)):
            summary = evaluate_checkpoint(
                "cmd-tiny-he-nuclei-dev", path, device=cpu, stain_normalise=normalise, indices=lab
            )
            assert summary["stain_normalised"] is normalise
            pq.append(summary["mean_pq"])
        spread[normalise] = abs(pq[0] - pq[1])
    assert spread[True] < spread[False] / 2, spread
