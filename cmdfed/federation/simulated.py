"""Virtual sites for ``cmdfed simulate``: synthetic stores split across N sites.

Each virtual site gets a store of its own under the simulation folder, made from
``cmdfed.data.synth`` tiles, whose stain style depends on the synthetic "site" they are
drawn for (``SiteStyle.for_site``). How tiles are dealt decides what kind of
heterogeneity the federation faces:

* ``by-store``: site k draws all its tiles in stain style k: every site its own scanner
  and staining (feature shift), class mix as the generator makes it.
* ``by-stain``: three stain styles shared among the sites (site k has style k mod 3):
  groups of sites that look alike, as hospitals using the same lab protocol.
* ``dirichlet:ALPHA``: label skew. A pool of tiles in all sites' styles is labelled by
  each tile's dominant nucleus type (most nucleus pixels); every type's tiles are dealt
  to the sites in proportions drawn from Dirichlet(ALPHA), the usual non-IID benchmark
  split (small ALPHA: each site sees few types; large: close to IID). Every site gets
  at least ``min_tiles`` tiles (taken from the largest sites), so none is empty.

All of it is seeded: the same arguments make the same stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmdfed.data.store import Tile, create_store
from cmdfed.data.synth import CLASS_NAMES, synth_tiles
from cmdfed.errors import CmdfedError
from cmdfed.federation.site import SiteSettings

SHARED_STAINS = 3


@dataclass(frozen=True)
class Split:
    kind: str  # by-store | by-stain | dirichlet
    alpha: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Split:
        kind, _, value = text.partition(":")
        if kind in ("by-store", "by-stain") and not value:
            return cls(kind)
        if kind == "dirichlet":
            try:
                alpha = float(value)
            except ValueError:
                alpha = 0.0
            if alpha > 0:
                return cls(kind, alpha)
        raise CmdfedError(
            f"--split {text!r} must be by-store, by-stain or dirichlet:ALPHA with ALPHA > 0, e.g. dirichlet:0.5"
        )


def write_simulated_sites(
    root: Path,
    n_sites: int,
    split: Split,
    tiles_per_site: int,
    *,
    seed: int = 0,
    tile_size: int = 64,
    min_tiles: int = 2,
) -> list[SiteSettings]:
    """One store per virtual site under ``root/stores``; their settings, named site-01..."""
    if n_sites < 1 or tiles_per_site < min_tiles:
        raise CmdfedError(f"a simulation needs at least one site and {min_tiles} tiles per site")
    if split.kind == "dirichlet":
        tiles = _dirichlet_split(n_sites, split.alpha, tiles_per_site, seed, tile_size, min_tiles)
    else:
        style = (lambda k: k) if split.kind == "by-store" else (lambda k: k % SHARED_STAINS)
        # seed + k: sites sharing a stain style still hold different tiles.
        tiles = [
            list(synth_tiles(tiles_per_site, tile_size, site=style(k), seed=seed * 1000 + k)) for k in range(n_sites)
        ]
    sites = []
    for k, site_tiles in enumerate(tiles):
        name = f"site-{k + 1:02d}"
        path = root / "stores" / f"{name}.zarr"
        with (
            create_store(
                path, overwrite=True, tile_size=tile_size, class_names=CLASS_NAMES, has_types=True, mpp=0.5
            ) as store,
            store.writer() as writer,
        ):
            writer.extend(site_tiles)
        sites.append(SiteSettings(path, name, root / "sites" / name, device="cpu"))
    return sites


def dominant_type(tile: Tile) -> int:
    """The nucleus type covering most pixels of the tile (0 when it has no typed nuclei)."""
    types = np.asarray(tile.types)[np.asarray(tile.instances) > 0]
    counts = np.bincount(types[types > 0], minlength=len(CLASS_NAMES))
    return int(counts.argmax()) if counts.any() else 0


def _dirichlet_split(
    n_sites: int, alpha: float, tiles_per_site: int, seed: int, tile_size: int, min_tiles: int
) -> list[list[Tile]]:
    rng = np.random.default_rng([seed, 7])
    pool = [
        tile for k in range(n_sites) for tile in synth_tiles(tiles_per_site, tile_size, site=k, seed=seed * 1000 + k)
    ]
    by_type: dict[int, list[Tile]] = {}
    for tile in pool:
        by_type.setdefault(dominant_type(tile), []).append(tile)
    dealt: list[list[Tile]] = [[] for _ in range(n_sites)]
    for kind in sorted(by_type):
        group = by_type[kind]
        order = rng.permutation(len(group))
        shares = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(group)).astype(int)
        for site, part in enumerate(np.split(order, cuts)):
            dealt[site].extend(group[i] for i in part)
    for site in range(n_sites):  # no empty sites: take from the largest
        while len(dealt[site]) < min_tiles:
            donor = max(range(n_sites), key=lambda s: len(dealt[s]))
            dealt[site].append(dealt[donor].pop())
    return dealt
