"""The grid (where tiles start) and seams: synthetic nuclei straddling tile borders are kept
exactly once, and whole."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from cmdfed.inference.nuclei import nucleus_records
from cmdfed.inference.tiling import TileGrid, grid_starts

TILE, OVERLAP, SIDE = 128, 32, 400
STRIDE = TILE - OVERLAP


def test_grid_starts_flush_with_the_edge():
    assert grid_starts(100, 32, 0, flush_end=True) == [0, 32, 64, 68]
    assert grid_starts(64, 32, 0, flush_end=True) == [0, 32]
    assert grid_starts(64, 32, 16, flush_end=True) == [0, 16, 32]
    assert grid_starts(20, 32, 0, flush_end=True) == [0]


def test_grid_starts_on_the_regular_grid_pad_the_last_tile():
    # Every start a multiple of the stride; the last tile still reaches uncovered pixels.
    assert grid_starts(100, 32, 0, flush_end=False) == [0, 32, 64, 96]
    assert grid_starts(64, 32, 16, flush_end=False) == [0, 16, 32]
    assert grid_starts(20, 32, 8, flush_end=False) == [0]
    assert grid_starts(400, TILE, OVERLAP, flush_end=False) == [0, 96, 192, 288]


def _truth(seed: int) -> np.ndarray:
    """Discs (diameter <= overlap) on every seam band and crossing, plus random ones."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((SIDE, SIDE), np.int32)
    seams = [STRIDE * k + OVERLAP // 2 + offset for k in (1, 2, 3) for offset in (-12, -1, 0, 1, 12)]
    centres = [(y, x) for y in seams[::3] for x in seams[1::3]]
    centres += [tuple(rng.integers(20, SIDE - 20, 2)) for _ in range(40)]
    for label, (y, x) in enumerate(centres, start=1):
        rr, cc = disk((y, x), rng.uniform(5, OVERLAP / 2 - 1), shape=labels.shape)
        free = labels[rr, cc] == 0
        labels[rr[free], cc[free]] = label
    return labels


def _grid_corners() -> list[tuple[int, int]]:
    starts = range(0, SIDE - OVERLAP, STRIDE)  # as cmdfed.data.slide.plan_tiles lays tiles out
    return [(x, y) for y in starts for x in starts]


def _stitch(truth: np.ndarray, grid: TileGrid) -> dict[int, list[int]]:
    """Global id -> areas of what the tiles kept of it, each tile seeing only its own crop."""
    padded = np.pad(truth, ((0, TILE), (0, TILE)))
    kept: dict[int, list[int]] = {}
    for x0, y0 in grid.corners:
        crop = padded[y0 : y0 + TILE, x0 : x0 + TILE]
        for nucleus in grid.owned((x0, y0), nucleus_records(crop)):
            kept.setdefault(nucleus.id, []).append(nucleus.area)
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_nucleus_is_kept_once_and_whole(seed):
    truth = _truth(seed)
    grid = TileGrid(TILE, OVERLAP, tuple(_grid_corners()))
    kept = _stitch(truth, grid)
    ids, areas = np.unique(truth[truth > 0], return_counts=True)
    assert sorted(kept) == ids.tolist()  # none lost
    assert [kept[i] for i in ids] == [[a] for a in areas.tolist()]  # each kept once, whole


def test_with_tiles_missing_nuclei_some_tile_sees_whole_are_kept_once_and_whole():
    truth = _truth(3)
    corners = [c for c in _grid_corners() if c not in {(STRIDE, STRIDE), (2 * STRIDE, 0)}]
    grid = TileGrid(TILE, OVERLAP, tuple(corners))
    kept = _stitch(truth, grid)
    ids, areas = np.unique(truth[truth > 0], return_counts=True)
    seen_whole = [
        (i, a)
        for i, a in zip(ids, areas)
        if any((truth[y0 : y0 + TILE, x0 : x0 + TILE] == i).sum() == a for x0, y0 in corners)
    ]
    assert len(seen_whole) > 0.8 * len(ids)
    assert all(kept.get(i) == [a] for i, a in seen_whole)


def test_nominal_cells_partition_the_slide():
    grid = TileGrid(TILE, OVERLAP, tuple(_grid_corners()))
    assert sum(grid.nominal_cell_area(c, SIDE, SIDE - 30) for c in grid.corners) == SIDE * (SIDE - 30)
