"""Slide tiling speed and peak memory: does memory stay flat as the slide grows?

Three slides, each tiled in its own process (so its peak RSS is its own):
the real sample SVS through OpenSlide; the same pixels as a generic pyramidal TIFF; and a
2 x 2 mosaic of it (4x the area) as a pyramidal TIFF written tile by tile. Memory should
not grow with the slide: the ratio of the 4x slide's peak RSS to the 1x TIFF's stays near 1.

    python -m benchmarks.slide_tiling
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from benchmarks.common import save
from cmdfed.data.samples import fetch_samples
from cmdfed.data.slide import open_slide

TILE = 256


def write_pyramid(source: Path, target: Path, repeat: int) -> tuple[int, int]:
    """A JPEG-tiled pyramidal TIFF of ``source`` repeated ``repeat`` x ``repeat``, tile by tile."""
    with open_slide(source) as reader:
        w0, h0 = reader.dimensions
        mpp = reader.mpp
        base = reader.read_region(0, 0, 0, w0, h0)  # the 6.6 Mpx sample fits; the mosaic is never built
    width, height = w0 * repeat, h0 * repeat

    def level_tiles(factor: int):
        lw, lh = width // factor, height // factor
        for ty in range(0, lh, TILE):
            for tx in range(0, lw, TILE):
                ys = (np.arange(ty, min(ty + TILE, lh)) * factor) % h0
                xs = (np.arange(tx, min(tx + TILE, lw)) * factor) % w0
                tile = np.full((TILE, TILE, 3), 255, np.uint8)
                tile[: len(ys), : len(xs)] = base[np.ix_(ys, xs)]
                yield tile

    opts = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg", "dtype": "uint8"}
    with tifffile.TiffWriter(target, bigtiff=True) as tif:
        tif.write(
            level_tiles(1),
            shape=(height, width, 3),
            subifds=2,
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
            **opts,
        )
        for factor in (4, 16):
            tif.write(level_tiles(factor), shape=(height // factor, width // factor, 3), subfiletype=1, **opts)
    return width, height


CHILD = """
import json, resource, sys, time
from cmdfed.data.slide import tile_slide, open_slide
slide, store = sys.argv[1], sys.argv[2]
with open_slide(slide) as r:
    reader, (w, h) = type(r).__name__, r.dimensions
start = time.perf_counter()
info = tile_slide(slide, store, tile_size=256)
seconds = time.perf_counter() - start
print(json.dumps({"reader": reader, "width": w, "height": h, "tiles": info.tiles, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(slide: Path, store: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(slide), str(store)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="cmdfed-bench-"))
    try:
        svs = fetch_samples(names=["cmu_small_region.svs"])["cmu_small_region.svs"]
        write_pyramid(svs, work / "x1.tif", 1)
        write_pyramid(svs, work / "x4.tif", 2)
        rows = []
        for name, path in (
            ("sample SVS", svs),
            ("sample as pyramid TIFF", work / "x1.tif"),
            ("4x mosaic pyramid TIFF", work / "x4.tif"),
        ):
            m = measure(path, work / f"{path.stem}.zarr")
            mpx = m["width"] * m["height"] / 1e6
            rows.append(
                {
                    "slide": name,
                    "reader": m["reader"],
                    "size": f"{m['width']}x{m['height']}",
                    "megapixels": round(mpx, 1),
                    "tissue tiles": m["tiles"],
                    "Mpx/s (whole slide)": round(mpx / m["seconds"], 2),
                    "seconds": round(m["seconds"], 2),
                    "peak RSS MB": round(m["peak_rss_mb"], 1),
                }
            )
        ratio = rows[2]["peak RSS MB"] / rows[1]["peak RSS MB"]
        for row in rows:
            row["RSS / 1x TIFF"] = round(row["peak RSS MB"] / rows[1]["peak RSS MB"], 2)
        save(
            "slide_tiling",
            rows,
            notes=f"peak RSS ratio 4x/1x pyramid TIFF = {ratio:.2f}; Mpx/s counts the whole slide area, background "
            "included",
        )
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
