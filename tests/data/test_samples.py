import os

import pytest

from cmdfed.checksums import sha256_of_file
from cmdfed.data.samples import SAMPLES, fetch_samples
from cmdfed.errors import CmdfedError

pytestmark = pytest.mark.network


@pytest.fixture
def unreachable_index(monkeypatch):
    """pip configured to an index on a closed loopback port and nothing else."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def test_fetch_from_a_clean_cache_verifies_every_file(tmp_path):
    paths = fetch_samples(tmp_path / "cache")
    assert set(paths) == set(SAMPLES)
    for name, path in paths.items():
        assert path.parent == tmp_path / "cache"
        assert sha256_of_file(path) == SAMPLES[name].sha256
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name not in SAMPLES]  # no temp files left


def test_cached_samples_work_offline_and_tampering_is_caught(tmp_path, unreachable_index, sample_files):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, path in sample_files.items():
        (cache / name).write_bytes(path.read_bytes())
    assert fetch_samples(cache)["histo.jpg"] == cache / "histo.jpg"  # no index needed
    (cache / "histo.jpg").write_bytes(b"not the real file")
    with pytest.raises(CmdfedError, match=r"could not download the stardist==0.9.2 wheel .*index reachable"):
        fetch_samples(cache)


def test_unreachable_index_says_what_failed(tmp_path, unreachable_index):
    with pytest.raises(CmdfedError, match=r"could not download the .* wheel that holds the sample data"):
        fetch_samples(tmp_path / "cache", names=["histo.jpg"])
    assert not (tmp_path / "cache" / "histo.jpg").exists()


def test_unknown_sample_name(tmp_path):
    with pytest.raises(CmdfedError, match="unknown sample"):
        fetch_samples(tmp_path, names=["nope.svs"])
