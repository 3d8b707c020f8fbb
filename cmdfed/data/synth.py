"""Synthetic H&E-like tiles with exact instance and type labels, and per-site stain shifts.

Not a substitute for real data (the real samples and importers are for that), but the one
source where every label is exact and the difference between sites is under control, which
is what tests and non-IID federated experiments need.

How a tile is made (Beer-Lambert, as a bright-field scanner sees a stained section):

1. An eosin concentration field: smooth noise (stroma) with a few empty lumina.
2. Nuclei of three types, drawn as irregular ellipses that never overlap (a later nucleus
   only claims background pixels, so every instance is one connected blob):

   ========== ============================ ===========================
   type       shape                        haematoxylin density
   ========== ============================ ===========================
   epithelial large, round to oval         medium, coarse chromatin
   lymphocyte small, round                 dense
   stromal    elongated spindle            medium-dense
   ========== ============================ ===========================

3. Optical density ``OD = H * h_vec + E * e_vec``, image ``255 * exp(-OD)``.

A *site* changes what a hospital's lab and scanner change: the stain vectors (rotated a
little), stain strength, blur, brightness/gamma and sensor noise. Site parameters are a
pure function of the site number, so site 3 looks the same on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from cmdfed.data.store import StoreInfo, Tile, create_store
from cmdfed.errors import CmdfedError
from cmdfed.progress import Progress, report

CLASS_NAMES = ["background", "epithelial", "lymphocyte", "stromal"]
# Ruifrok & Johnston (2001) optical-density vectors for haematoxylin and eosin.
H_VECTOR = np.array([0.650, 0.704, 0.286])
E_VECTOR = np.array([0.072, 0.990, 0.105])

# type id: (mean radius px at 0.5 um/px, elongation range, H density, weight in the mix)
NUCLEUS_TYPES = {
    1: (7.0, (1.0, 1.5), 1.0, 0.45),
    2: (4.0, (1.0, 1.15), 1.6, 0.35),
    3: (4.5, (2.2, 3.5), 1.2, 0.20),
}


@dataclass(frozen=True)
class SiteStyle:
    """How one hospital's staining and scanner render a section."""

    h_vector: np.ndarray
    e_vector: np.ndarray
    h_strength: float
    e_strength: float
    blur_sigma: float
    gamma: float
    noise: float

    @classmethod
    def for_site(cls, site: int) -> SiteStyle:
        if site == 0:  # the reference site: textbook stain vectors, sharp scanner
            return cls(H_VECTOR, E_VECTOR, 1.0, 1.0, 0.6, 1.0, 2.0)
        rng = np.random.default_rng(10_000 + site)

        def tilt(v: np.ndarray) -> np.ndarray:
            w = np.clip(v + rng.normal(0, 0.08, 3), 0.01, None)
            return w / np.linalg.norm(w)

        return cls(
            h_vector=tilt(H_VECTOR),
            e_vector=tilt(E_VECTOR),
            h_strength=float(rng.uniform(0.7, 1.3)),
            e_strength=float(rng.uniform(0.6, 1.4)),
            blur_sigma=float(rng.uniform(0.3, 1.4)),
            gamma=float(rng.uniform(0.85, 1.15)),
            noise=float(rng.uniform(1.0, 5.0)),
        )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def _draw_nucleus(
    rng: np.random.Generator, size: int, radius: float, elongation: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Pixel coordinates (rows, cols) of one irregular ellipse placed at random."""
    e = rng.uniform(*elongation)
    a, b = radius * math.sqrt(e), radius / math.sqrt(e)
    theta = rng.uniform(0, math.pi)
    cy, cx = rng.uniform(0, size, 2)
    reach = math.ceil(a * 1.3) + 1
    y0, y1 = max(0, int(cy) - reach), min(size, int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(size, int(cx) + reach + 1)
    if y1 <= y0 or x1 <= x0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    angle = np.arctan2(v, u)
    # Irregular outline: the radius wobbles with two low harmonics of random phase.
    wobble = 1 + 0.08 * np.sin(2 * angle + rng.uniform(0, 6.3)) + 0.05 * np.sin(3 * angle + rng.uniform(0, 6.3))
    inside = (u / a) ** 2 + (v / b) ** 2 <= wobble**2
    return yy[inside], xx[inside]


def synth_tile(
    rng: np.random.Generator, tile_size: int, style: SiteStyle, density: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (image uint8 HxWx3, instances int32 HxW, types uint8 HxW) triple."""
    size = tile_size
    instances = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.uint8)
    hema = np.zeros((size, size))

    ids, weights = list(NUCLEUS_TYPES), np.array([t[3] for t in NUCLEUS_TYPES.values()])
    n_nuclei = rng.poisson(density * size * size / 900)
    next_id = 1
    for _ in range(n_nuclei):
        kind = int(rng.choice(ids, p=weights / weights.sum()))
        radius, elongation, h_density, _ = NUCLEUS_TYPES[kind]
        drawn = _draw_nucleus(rng, size, radius * rng.uniform(0.8, 1.25), elongation)
        if drawn is None:
            continue
        rows, cols = drawn
        free = instances[rows, cols] == 0
        # Skip nuclei that would be mostly hidden: each kept instance stays one blob.
        if free.sum() < max(8, 0.85 * rows.size):
            continue
        rows, cols = rows[free], cols[free]
        instances[rows, cols] = next_id
        types[rows, cols] = kind
        hema[rows, cols] = h_density * rng.uniform(0.85, 1.15)
        next_id += 1

    chromatin = 1 + 0.25 * _smooth_noise(rng, (size, size), 1.0)
    hema = hema * chromatin
    hema[instances > 0] = np.clip(hema[instances > 0], 0.3, None)

    eosin = 0.35 + 0.12 * _smooth_noise(rng, (size, size), 6.0) + 0.05 * _smooth_noise(rng, (size, size), 1.5)
    lumina = _smooth_noise(rng, (size, size), 18.0) > 1.6
    eosin[lumina] *= 0.15
    eosin = np.clip(eosin, 0.02, None)
    eosin[instances > 0] *= 0.5

    od = (hema * style.h_strength)[..., None] * style.h_vector + (eosin * style.e_strength)[..., None] * style.e_vector
    rgb = np.exp(-od)
    rgb = ndimage.gaussian_filter(rgb, sigma=(style.blur_sigma, style.blur_sigma, 0))
    rgb = rgb**style.gamma * 255.0 + rng.normal(0, style.noise, rgb.shape)
    image = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return image, instances, types


def synth_tiles(n: int, tile_size: int = 256, site: int = 0, seed: int = 0) -> Iterator[Tile]:
    rng = np.random.default_rng([seed, site])
    style = SiteStyle.for_site(site)
    for i in range(n):
        image, instances, types = synth_tile(rng, tile_size, style, density=rng.uniform(0.7, 1.3))
        yield Tile(
            image=image,
            instances=instances,
            types=types,
            source="synthetic",
            slide_id=f"synth-site{site}-seed{seed}",
            x=i * tile_size,
            y=0,
            mpp=0.5,
        )


def write_synthetic_store(
    path: str | Path,
    n: int,
    *,
    site: int = 0,
    seed: int = 0,
    tile_size: int = 256,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StoreInfo:
    if n <= 0:
        raise CmdfedError(f"number of tiles must be positive, got {n}")
    options = {"tile_size": tile_size, "class_names": CLASS_NAMES, "has_types": True, "mpp": 0.5}
    with create_store(path, overwrite=overwrite, **options) as store, store.writer() as writer:
        for i, tile in enumerate(synth_tiles(n, tile_size, site, seed), start=1):
            writer.add(tile)
            report(progress, i, n, "synthetic tiles")
    return store.info()
