import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from cmdfed.data.store import SCHEMA_VERSION, SiteStore, Tile, create_store, write_subset
from cmdfed.errors import CmdfedError

T = 32


def make_tile(i: int, labelled: bool = True) -> Tile:
    inst = np.zeros((T, T), np.int32)
    if labelled:
        inst[2:6, 2:6] = 1
        inst[10:14, 10 : 12 + i % 5] = 2
    return Tile(
        image=np.full((T, T, 3), i % 256, np.uint8),
        instances=inst if labelled else None,
        types=(inst > 0).astype(np.uint8) * (1 + i % 2) if labelled else None,
        source="test",
        slide_id=f"slide-{i // 4}",
        tissue="Breast" if i % 2 else "Colon",
        x=i * T,
        y=7,
        mpp=0.25,
        tissue_fraction=0.5,
    )


def new_store(path: Path, n: int, shard: int = 4, labelled=lambda i: True) -> SiteStore:
    store = SiteStore.create(
        path, tile_size=T, class_names=["background", "a", "b"], has_types=True, shard_tiles=shard, mpp=0.25
    )
    with store.writer() as writer:
        for i in range(n):
            writer.add(make_tile(i, labelled(i)))
    return store


def test_round_trip_keeps_pixels_labels_and_metadata(tmp_path):
    new_store(tmp_path / "s.zarr", 10, labelled=lambda i: i % 3 != 0)
    store = SiteStore.open(tmp_path / "s.zarr")
    assert len(store) == 10
    for i in range(10):
        tile, expected = store.tile(i), make_tile(i, i % 3 != 0)
        assert np.array_equal(tile.image, expected.image)
        assert tile.labelled == expected.labelled
        if expected.labelled:
            assert np.array_equal(tile.instances, expected.instances)
            assert np.array_equal(tile.types, expected.types)
        assert (tile.source, tile.slide_id, tile.tissue, tile.x, tile.y) == (
            "test",
            f"slide-{i // 4}",
            expected.tissue,
            i * T,
            7,
        )
        assert tile.mpp == pytest.approx(0.25) and tile.tissue_fraction == pytest.approx(0.5)
    info = store.info()
    assert (info.tiles, info.labelled, info.nuclei) == (10, 6, 12)
    assert info.labelled_fraction == pytest.approx(0.6)
    assert json.loads(json.dumps(info.to_dict()))["tile_size"] == T


def test_arrays_are_one_chunk_per_tile_inside_shards(tmp_path):
    store = new_store(tmp_path / "s.zarr", 10, shard=4)
    images = store._group["images"]
    assert images.chunks == (1, T, T, 3) and images.shards == (4, T, T, 3)
    shard_files = sorted(p.name for p in (tmp_path / "s.zarr" / "images" / "c").iterdir())
    assert shard_files == ["0", "1", "2"]  # 10 tiles in shards of 4


def test_writer_buffers_until_a_shard_is_full_and_commits_on_close(tmp_path):
    store = new_store(tmp_path / "s.zarr", 0, shard=4)
    shard_dir = tmp_path / "s.zarr" / "images" / "c"
    writer = store.writer()
    for i in range(3):
        writer.add(make_tile(i))
    assert not shard_dir.exists()  # nothing written before a shard is full
    writer.add(make_tile(3))
    assert [p.name for p in shard_dir.iterdir()] == ["0"]
    assert len(SiteStore.open(tmp_path / "s.zarr")) == 0  # written but not committed
    writer.add(make_tile(4))
    writer.close()
    assert len(SiteStore.open(tmp_path / "s.zarr")) == 5


def test_append_to_partial_shard_keeps_earlier_tiles(tmp_path):
    new_store(tmp_path / "s.zarr", 6)
    store = SiteStore.open(tmp_path / "s.zarr", mode="r+")
    with store.writer() as writer:
        for i in range(6, 11):
            writer.add(make_tile(i))
    reread = SiteStore.open(tmp_path / "s.zarr")
    assert len(reread) == 11
    assert [int(reread.image(i)[0, 0, 0]) for i in range(11)] == list(range(11))


def test_exception_inside_writer_leaves_previous_length(tmp_path):
    new_store(tmp_path / "s.zarr", 5)
    store = SiteStore.open(tmp_path / "s.zarr", mode="r+")
    with pytest.raises(RuntimeError), store.writer() as writer:
        for i in range(5, 14):
            writer.add(make_tile(i))
        raise RuntimeError("import failed half way")
    reread = SiteStore.open(tmp_path / "s.zarr")
    assert len(reread) == 5
    assert reread._group["images"].shape[0] == 5  # uncommitted tail trimmed


def test_killed_writer_leaves_store_readable_at_previous_length(tmp_path):
    path = tmp_path / "s.zarr"
    new_store(path, 5)
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from cmdfed.data.store import SiteStore, Tile
        store = SiteStore.open({str(path)!r}, mode="r+")
        writer = store.writer()
        for i in range(11):  # crosses two shard boundaries, so shards hit the disk
            writer.add(Tile(image=np.full(({T}, {T}, 3), 200, np.uint8)))
        os._exit(9)  # killed before close
        """
    )
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    store = SiteStore.open(path)
    assert len(store) == 5
    assert [int(store.image(i)[0, 0, 0]) for i in range(5)] == list(range(5))
    # The next writer trims the orphaned tail and appends cleanly.
    store = SiteStore.open(path, mode="r+")
    with store.writer() as writer:
        writer.add(make_tile(42))
    store = SiteStore.open(path)
    assert len(store) == 6 and store.image(5)[0, 0, 0] == 42
    assert store._group["images"].shape[0] == 6


def test_bad_tiles_are_refused_with_the_reason(tmp_path):
    store = SiteStore.create(tmp_path / "s.zarr", tile_size=T, class_names=["background", "a"], has_types=True)
    writer = store.writer()
    with pytest.raises(CmdfedError, match=r"uint8 of shape \(32, 32, 3\)"):
        writer.add(Tile(image=np.zeros((T, T, 3), np.float32)))
    with pytest.raises(CmdfedError, match=r"uint8 of shape"):
        writer.add(Tile(image=np.zeros((T, T + 1, 3), np.uint8)))
    with pytest.raises(CmdfedError, match=r"instance map must have shape"):
        writer.add(Tile(image=np.zeros((T, T, 3), np.uint8), instances=np.zeros((T, 5), np.int32)))
    with pytest.raises(CmdfedError, match=r"class 3 but the store has only 2 classes"):
        writer.add(
            Tile(
                image=np.zeros((T, T, 3), np.uint8),
                instances=np.zeros((T, T), np.int32),
                types=np.full((T, T), 3, np.uint8),
            )
        )


def test_tile_size_must_be_a_multiple_of_32(tmp_path):
    with pytest.raises(CmdfedError, match="multiple of 32"):
        SiteStore.create(tmp_path / "s.zarr", tile_size=100)


def test_opening_something_else_names_the_path(tmp_path):
    with pytest.raises(CmdfedError, match=f"{tmp_path / 'missing.zarr'} does not exist"):
        SiteStore.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CmdfedError, match=rf"{tmp_path / 'plain'} is not a cmdfed site store \(no zarr.json"):
        SiteStore.open(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["hello"] = 1
    with pytest.raises(CmdfedError, match="other.zarr is not a cmdfed site store .*without cmdfed attributes"):
        SiteStore.open(tmp_path / "other.zarr")
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(CmdfedError, match="broken.zarr is not a cmdfed site store .*unreadable"):
        SiteStore.open(tmp_path / "broken.zarr")


def test_newer_schema_is_refused(tmp_path):
    new_store(tmp_path / "s.zarr", 2)
    zarr.open_group(str(tmp_path / "s.zarr"), mode="r+").attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(
        CmdfedError, match=rf"s.zarr has store schema version {SCHEMA_VERSION + 1}, newer .* upgrade cmdfed"
    ):
        SiteStore.open(tmp_path / "s.zarr")


def test_damaged_shard_gives_an_error_naming_the_store(tmp_path):
    new_store(tmp_path / "s.zarr", 8)
    shard = tmp_path / "s.zarr" / "images" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[: len(data) // 3]))  # truncated, as after a disk error
    store = SiteStore.open(tmp_path / "s.zarr")
    assert store.image(0)[0, 0, 0] == 0  # other shards still read
    with pytest.raises(CmdfedError, match=rf"{tmp_path / 's.zarr'}: cannot read 'images' .*damaged"):
        store.image(5)


def test_labelled_subsets_are_reproducible_and_nested(tmp_path):
    store = new_store(tmp_path / "s.zarr", 40, labelled=lambda i: i % 4 != 0)
    labelled = set(store.labelled_indices().tolist())
    assert len(labelled) == 30
    a, b = store.labelled_subset(0.1, seed=3), store.labelled_subset(0.1, seed=3)
    assert np.array_equal(a, b) and len(a) == 3 and set(a) <= labelled
    small, large = set(store.labelled_subset(0.1, 1)), set(store.labelled_subset(0.5, 1))
    assert small <= large and len(large) == 15
    assert len(store.labelled_subset(0.01, 1)) == 1  # at least one tile
    assert set(store.labelled_subset(1.0, 1)) == labelled
    assert not np.array_equal(store.labelled_subset(0.5, 1), store.labelled_subset(0.5, 2))
    with pytest.raises(CmdfedError, match=r"in \(0, 1\]"):
        store.labelled_subset(0.0)


def test_write_subset_copies_the_chosen_tiles(tmp_path):
    src = new_store(tmp_path / "s.zarr", 20)
    info = write_subset(tmp_path / "s.zarr", tmp_path / "sub.zarr", fraction=0.25, seed=0)
    chosen = src.labelled_subset(0.25, 0)
    sub = SiteStore.open(tmp_path / "sub.zarr")
    assert info.tiles == len(sub) == 5
    assert [int(sub.image(i)[0, 0, 0]) for i in range(5)] == chosen.tolist()
    assert sub.class_names == src.class_names and sub.attrs["subset_of"]["fraction"] == 0.25


def test_failed_create_store_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), create_store(tmp_path / "new.zarr", tile_size=T, has_types=True) as store:
        with store.writer() as writer:
            writer.add(make_tile(0))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_create_store_replaces_only_on_success_with_overwrite(tmp_path):
    new_store(tmp_path / "s.zarr", 3)
    with pytest.raises(CmdfedError, match="already exists"), create_store(tmp_path / "s.zarr", tile_size=T):
        pass
    with pytest.raises(RuntimeError), create_store(tmp_path / "s.zarr", tile_size=T, overwrite=True):
        raise RuntimeError("boom")
    assert len(SiteStore.open(tmp_path / "s.zarr")) == 3
    with create_store(tmp_path / "s.zarr", tile_size=T, overwrite=True) as store, store.writer() as writer:
        writer.add(Tile(image=np.full((T, T, 3), 9, np.uint8)))
    assert len(store) == 1 and store.path == tmp_path / "s.zarr" and store.image(0)[0, 0, 0] == 9


def test_overwrite_replaces_only_a_site_store(tmp_path):
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.docx").write_text("years of work")
    with (
        pytest.raises(CmdfedError, match="not a cmdfed site store; refusing to replace it"),
        create_store(documents, tile_size=T, overwrite=True),
    ):
        pass
    assert (documents / "thesis.docx").read_text() == "years of work"


def test_a_failed_final_rename_puts_the_old_store_back(tmp_path, monkeypatch):
    new_store(tmp_path / "s.zarr", 3)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("disk full (injected)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with (
        pytest.raises(OSError, match="injected"),
        create_store(tmp_path / "s.zarr", tile_size=T, overwrite=True) as store,
        store.writer() as writer,
    ):
        writer.add(Tile(image=np.zeros((T, T, 3), np.uint8)))
    monkeypatch.undo()
    assert len(SiteStore.open(tmp_path / "s.zarr")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_read_only_store_refuses_writer(tmp_path):
    new_store(tmp_path / "s.zarr", 1)
    with pytest.raises(CmdfedError, match="read-only"):
        SiteStore.open(tmp_path / "s.zarr").writer()
