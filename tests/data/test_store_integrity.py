"""Fault injection on site stores (issue #14, finding 4): a store records which chunk files
it holds when it is written and checks them (file presence only, no data read) when opened,
so a deleted chunk is a clear refusal naming the tiles, not tiles that read as empty."""

from __future__ import annotations

import logging
import shutil

import pytest
from typer.testing import CliRunner

from cmdfed.cli import app
from cmdfed.data.store import SiteStore, create_store
from cmdfed.errors import CmdfedError
from cmdfed.model.config import ModelConfig
from cmdfed.train.loop import TrainConfig
from cmdfed.train.phases import finetune

from .test_store import make_tile, new_store


@pytest.fixture
def store(synthetic_store, tmp_path):
    """A copy of the 12-tile synthetic store (shards of 4 tiles, labelled)."""
    copy = tmp_path / "site.zarr"
    shutil.copytree(synthetic_store, copy)
    return copy


@pytest.mark.parametrize(
    "chunk, array, tiles",
    [
        ("instances/c/1/0/0", "instances", "tiles 4-7"),
        ("labelled/c/0", "labelled", "tiles 0-11"),
        ("images/c/2/0/0/0", "images", "tiles 8-11"),
    ],
)
def test_a_deleted_chunk_is_refused_naming_the_tiles(store, chunk, array, tiles):
    (store / chunk).unlink()
    with pytest.raises(CmdfedError, match=rf"'{array}'.*{tiles}.*re-import"):
        SiteStore.open(store)
    result = CliRunner().invoke(app, ["data", "info", str(store)])
    assert result.exit_code != 0 and isinstance(result.exception, CmdfedError)


def test_training_on_a_store_with_a_deleted_chunk_is_refused_and_writes_nothing(store, tmp_path):
    (store / "instances" / "c" / "1" / "0" / "0").unlink()
    config = TrainConfig(steps=1, batch_size=2, warmup_steps=1, checkpoint_every=1, sample_every=0)
    with pytest.raises(CmdfedError, match="instances.*tiles 4-7"):
        finetune(
            store,
            tmp_path / "run",
            init=None,
            model_config=ModelConfig.from_preset("tiny"),
            train_config=config,
            device="cpu",
        )
    assert not (tmp_path / "run").exists()


def test_chunks_never_written_are_not_missing(tmp_path):
    """Empty chunks are not written (zarr skips fill values): unlabelled tiles, blank metadata."""
    path = tmp_path / "s.zarr"
    new_store(path, 9, labelled=lambda i: i >= 4)  # shard 0 of instances and types stays unwritten
    assert not (path / "instances" / "c" / "0").exists()
    store = SiteStore.open(path, mode="r+")  # appending keeps the record up to date
    with store.writer() as writer:
        writer.add(make_tile(9))
    assert len(SiteStore.open(path)) == 10


def test_a_damaged_store_can_still_be_replaced(store):
    (store / "images" / "c" / "0" / "0" / "0" / "0").unlink()
    with (
        create_store(store, overwrite=True, tile_size=32, class_names=["background", "a", "b"], has_types=True) as new,
        new.writer() as writer,
    ):
        writer.add(make_tile(0))
    assert len(SiteStore.open(store)) == 1


def test_a_store_from_before_the_record_opens_with_one_warning(store, caplog):
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    del group.attrs["chunks"]
    with caplog.at_level(logging.WARNING, logger="cmdfed.data"):
        SiteStore.open(store)
        SiteStore.open(store)
    assert len([r for r in caplog.records if "records no chunk list" in r.getMessage()]) == 1
