import numpy as np
import pytest
from scipy import ndimage

from cmdfed.data.store import SiteStore
from cmdfed.data.synth import CLASS_NAMES, SiteStyle, synth_tiles, write_synthetic_store
from cmdfed.errors import CmdfedError


def test_labels_are_exact_one_type_and_one_blob_per_nucleus():
    for tile in synth_tiles(3, tile_size=128, site=2, seed=1):
        ids = np.unique(tile.instances)
        ids = ids[ids > 0]
        assert len(ids) > 5
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # sequential ids
        for i in ids:
            blob = tile.instances == i
            assert np.unique(tile.types[blob]).size == 1 and tile.types[blob][0] in (1, 2, 3)
            assert ndimage.label(blob)[1] == 1
        assert np.array_equal(tile.types > 0, tile.instances > 0)


def test_nuclei_are_darker_than_stroma():
    tile = next(synth_tiles(1, tile_size=256, site=0, seed=0))
    grey = tile.image.mean(axis=-1)
    assert grey[tile.instances > 0].mean() < grey[tile.instances == 0].mean() - 40


def test_same_seed_same_tiles_and_sites_differ_in_stain():
    a = [t.image for t in synth_tiles(2, 64, site=1, seed=5)]
    b = [t.image for t in synth_tiles(2, 64, site=1, seed=5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.allclose(SiteStyle.for_site(3).h_vector, SiteStyle.for_site(3).h_vector)
    assert not np.allclose(SiteStyle.for_site(3).h_vector, SiteStyle.for_site(4).h_vector)
    means = [
        np.mean([t.image.reshape(-1, 3).mean(0) for t in synth_tiles(4, 128, site=s, seed=0)], axis=0)
        for s in (0, 3, 5)
    ]
    assert (
        min(np.abs(means[0] - means[1]).max(), np.abs(means[0] - means[2]).max(), np.abs(means[1] - means[2]).max()) > 3
    )


def test_write_synthetic_store(tmp_path):
    info = write_synthetic_store(tmp_path / "syn.zarr", 5, site=1, seed=2, tile_size=64)
    store = SiteStore.open(tmp_path / "syn.zarr")
    assert info.tiles == 5 == info.labelled and store.class_names == CLASS_NAMES and store.has_types
    assert store.tile(0).source == "synthetic"
    with pytest.raises(CmdfedError, match="positive"):
        write_synthetic_store(tmp_path / "none.zarr", 0)
