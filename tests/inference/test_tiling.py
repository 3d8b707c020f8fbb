"""The grid (where tiles start) and seams: every point has one owning tile, and synthetic
nuclei straddling tile borders are kept exactly once, and whole."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from skimage.draw import disk

from cmdfed.inference.nuclei import nucleus_records
from cmdfed.inference.tiling import TileGrid, grid_starts

TILE, OVERLAP = 128, 32
STRIDE = TILE - OVERLAP
# 400 - 128 = 272 and 330 - 128 = 202 are no multiples of the stride: the last tiles are moved
# back to the edge (by 16 and 86 pixels), so the last shared bands are wider than the overlap.
WIDTH, HEIGHT = 400, 330


@pytest.mark.parametrize(("tile", "overlap"), [(32, 0), (32, 16), (128, 32), (64, 63)])
def test_grid_starts_cover_the_axis_flush_with_its_end(tile, overlap):
    for length in range(tile, 5 * tile):
        starts = grid_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length  # covered, no padding
        steps = np.diff(starts).tolist()
        assert all(step == tile - overlap for step in steps[:-1])  # every stride from 0...
        assert all(0 < step <= tile - overlap for step in steps[-1:])  # ...the last moved back: it overlaps more


def test_an_axis_shorter_than_a_tile_has_one_tile_at_zero():
    assert [grid_starts(length, 32, 8) for length in (1, 20, 31, 32)] == [[0]] * 4


def _full_grid(width: int = WIDTH, height: int = HEIGHT) -> TileGrid:
    corners = itertools.product(grid_starts(width, TILE, OVERLAP), grid_starts(height, TILE, OVERLAP))
    return TileGrid(TILE, OVERLAP, width, height, tuple(corners))


def test_every_point_of_the_image_has_one_owner_well_inside_its_tile():
    grid = _full_grid()
    owners: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for x, y in itertools.product(np.arange(0, WIDTH, 0.5), np.arange(0, HEIGHT, 0.5)):
        owners.setdefault(grid.owner(x, y), []).append((x, y))
    assert None not in owners and set(owners) == set(grid.corners)  # every point one owner, every tile owns
    for (x0, y0), points in owners.items():
        xs, ys = np.array(points).T
        # O/2 from every tile edge inside the image: a nucleus of diameter <= O centred there is whole.
        assert x0 == 0 or xs.min() - x0 >= OVERLAP / 2
        assert y0 == 0 or ys.min() - y0 >= OVERLAP / 2
        assert x0 + TILE == WIDTH or x0 + TILE - xs.max() >= OVERLAP / 2
        assert y0 + TILE == HEIGHT or y0 + TILE - ys.max() >= OVERLAP / 2


@pytest.mark.parametrize("length", [400, 330, 2 * TILE - OVERLAP + 1])
def test_the_border_between_two_cells_is_the_middle_of_their_shared_band(length):
    grid = _full_grid(length, length)
    starts = grid_starts(length, TILE, OVERLAP)
    for left, right in itertools.pairwise(starts):
        middle = (left + TILE + right) / 2
        assert grid.owner(middle - 0.25, 0)[0] == left and grid.owner(middle, 0)[0] == right
        assert grid.owner(0, middle - 0.25)[1] == left and grid.owner(0, middle)[1] == right


def test_nominal_cells_partition_the_image_as_the_owners_do():
    for width, height in [(WIDTH, HEIGHT), (HEIGHT, TILE + 1), (100, 90)]:
        grid = _full_grid(width, height)
        owned = dict.fromkeys(grid.corners, 0)
        for x, y in itertools.product(range(width), range(height)):
            owned[grid.owner(x, y)] += 1
        assert {c: grid.nominal_cell_area(c) for c in grid.corners} == owned
        assert sum(owned.values()) == width * height


def _truth(seed: int) -> np.ndarray:
    """Discs (diameter <= overlap) on both edges and the middle of every band two tiles
    share, and on their crossings, plus random ones."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((HEIGHT, WIDTH), np.int32)

    def seams(length: int) -> list[int]:
        starts = grid_starts(length, TILE, OVERLAP)
        lines = [p for a, b in itertools.pairwise(starts) for p in (b, (a + b + TILE) // 2, a + TILE)]
        return [p + offset for p in lines for offset in (-12, -1, 0, 1, 12)]

    centres = [(y, x) for y in seams(HEIGHT)[::3] for x in seams(WIDTH)[1::3]]
    centres += [tuple(rng.integers(20, (HEIGHT - 20, WIDTH - 20))) for _ in range(40)]
    for label, (y, x) in enumerate(centres, start=1):
        rr, cc = disk((y, x), rng.uniform(5, OVERLAP / 2 - 1), shape=labels.shape)
        free = labels[rr, cc] == 0
        labels[rr[free], cc[free]] = label
    return labels


def _stitch(truth: np.ndarray, grid: TileGrid) -> dict[int, list[int]]:
    """Global id -> areas of what the tiles kept of it, each tile seeing only its own crop."""
    kept: dict[int, list[int]] = {}
    for x0, y0 in grid.corners:
        crop = truth[y0 : y0 + TILE, x0 : x0 + TILE]
        for nucleus in grid.owned((x0, y0), nucleus_records(crop)):
            kept.setdefault(nucleus.id, []).append(nucleus.area)
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_nucleus_is_kept_once_and_whole(seed):
    truth = _truth(seed)
    kept = _stitch(truth, _full_grid())
    ids, areas = np.unique(truth[truth > 0], return_counts=True)
    assert sorted(kept) == ids.tolist()  # none lost
    assert [kept[i] for i in ids] == [[a] for a in areas.tolist()]  # each kept once, whole


def test_with_tiles_missing_only_nuclei_reaching_their_squares_may_be_cut_or_kept_twice():
    """The fallback gives a missing tile's cell to a neighbour, which may see a nucleus there
    cut (``edge.infer`` drops and counts such ones); nuclei elsewhere are as with every tile."""
    truth = _truth(3)
    last_x, last_y = WIDTH - TILE, HEIGHT - TILE
    missing = {(STRIDE, STRIDE), (2 * STRIDE, 0), (last_x, last_y), (last_x - STRIDE, last_y)}
    grid = TileGrid(TILE, OVERLAP, WIDTH, HEIGHT, tuple(c for c in _full_grid().corners if c not in missing))
    kept = _stitch(truth, grid)
    near_missing = np.zeros(truth.shape, bool)
    for x0, y0 in missing:
        near_missing[y0 : y0 + TILE, x0 : x0 + TILE] = True
    ids, areas = np.unique(truth[truth > 0], return_counts=True)
    away = [(i, a) for i, a in zip(ids, areas) if not near_missing[truth == i].any()]
    assert away and all(kept.get(i) == [a] for i, a in away)
    assert sum(kept.get(i) == [a] for i, a in zip(ids, areas)) > 0.8 * len(ids)


def _nearest_containing(corners, x: float, y: float) -> tuple[int, int] | None:
    """Of the tiles containing (x, y), the one whose centre is nearest; ties: top-most, then left-most."""
    containing = [(cx, cy) for cx, cy in corners if cx <= x < cx + TILE and cy <= y < cy + TILE]
    if not containing:
        return None
    half = TILE / 2
    return min(containing, key=lambda c: ((c[0] + half - x) ** 2 + (c[1] + half - y) ** 2, c[1], c[0]))


def test_a_missing_tile_s_cell_goes_to_the_containing_tile_whose_centre_is_nearest():
    full = _full_grid()
    last_x, last_y = WIDTH - TILE, HEIGHT - TILE
    missing = {(STRIDE, STRIDE), (last_x, last_y)}
    grid = TileGrid(TILE, OVERLAP, WIDTH, HEIGHT, tuple(c for c in full.corners if c not in missing))
    # (115, 115) lies in (96, 96)'s cell, as far from the centre of (0, 96) as from that of (96, 0): the top-most.
    assert full.owner(115, 115) == (STRIDE, STRIDE) and grid.owner(115, 115) == (STRIDE, 0)
    checked = 0
    for x, y in itertools.product(np.arange(0, WIDTH, 1.5), np.arange(0, HEIGHT, 1.5)):
        if full.owner(x, y) not in missing:
            continue
        expected = _nearest_containing(grid.corners, x, y)
        assert grid.owner(x, y) == expected
        checked += expected is not None
    assert checked > 1000  # points of a missing cell that other tiles contain


def test_only_tile_edges_inside_the_image_cut_nuclei():
    grid = _full_grid()
    crop = np.zeros((TILE, TILE), np.int32)
    crop[50:60, TILE - 8 :] = 1  # reaches the tile's right edge
    crop[TILE - 8 :, 50:60] = 2  # reaches its bottom edge
    right, bottom = nucleus_records(crop)
    last_x, last_y = WIDTH - TILE, HEIGHT - TILE
    assert grid.touches_inner_edge((STRIDE, STRIDE), right) and grid.touches_inner_edge((STRIDE, STRIDE), bottom)
    assert not grid.touches_inner_edge((last_x, STRIDE), right)  # flush with the image's right edge
    assert not grid.touches_inner_edge((STRIDE, last_y), bottom)
    small = TileGrid(TILE, OVERLAP, 100, 90, ((0, 0),))  # one tile, reaching past the image
    assert not small.touches_inner_edge((0, 0), right) and not small.touches_inner_edge((0, 0), bottom)
