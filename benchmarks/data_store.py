"""Site store throughput: writing tiles, and random reads through a training DataLoader.

Sharded (one chunk per tile, 64 tiles per shard file; the cmdfed default) against one file per
tile chunk, on 256 px tiles cut from the real sample slide (repeated to reach --tiles).

    python -m benchmarks.data_store [--tiles 1024]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import save
from cmdfed.data.dataset import SiteDataset
from cmdfed.data.samples import fetch_samples
from cmdfed.data.slide import tile_slide
from cmdfed.data.store import SiteStore


def source_tiles(work: Path) -> list:
    slide = fetch_samples(names=["cmu_small_region.svs"])["cmu_small_region.svs"]
    tile_slide(slide, work / "source.zarr", tile_size=256)
    store = SiteStore.open(work / "source.zarr")
    return [store.tile(i) for i in range(len(store))]


def write(path: Path, tiles: list, n: int, shard_tiles: int | None) -> float:
    store = SiteStore.create(path, tile_size=256, shard_tiles=shard_tiles)
    start = time.perf_counter()
    with store.writer() as writer:
        for i in range(n):
            writer.add(tiles[i % len(tiles)])
    return n / (time.perf_counter() - start)


def read(path: Path, workers: int, n_batches: int = 24, batch: int = 16) -> float:
    torch.manual_seed(0)
    loader = DataLoader(SiteDataset(path, augment=False), batch_size=batch, shuffle=True, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up is not read throughput
    start = time.perf_counter()
    seen = 0
    for _ in range(n_batches):
        seen += len(next(it)["image"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiles", type=int, default=1024)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cmdfed-bench-"))
    try:
        tiles = source_tiles(work)
        rows = []
        for layout, shard in (("sharded (64 tiles/shard)", 64), ("one file per tile", None)):
            path = work / f"{shard}.zarr"
            w = write(path, tiles, args.tiles, shard)
            files = sum(1 for p in path.rglob("*") if p.is_file())
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
            rows.append(
                {
                    "layout": layout,
                    "tiles": args.tiles,
                    "files": files,
                    "MB": round(size, 1),
                    "write tiles/s": round(w, 1),
                    "read tiles/s (1 worker)": round(read(path, 1), 1),
                    "read tiles/s (2 workers)": round(read(path, 2), 1),
                }
            )
        save("data_store", rows, notes=f"{len(tiles)} distinct 256 px tiles from cmu_small_region.svs, repeated")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
