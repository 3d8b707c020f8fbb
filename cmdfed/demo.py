"""``cmdfed demo``: the product's main job end to end on this machine, one step at a time.

For now: fetch the real samples, cut the sample slide into an unlabelled site store, make a
synthetic labelled store, and report both. Training, federation and the edge extend it.
"""

from __future__ import annotations

from pathlib import Path

from cmdfed.data.samples import fetch_samples
from cmdfed.data.slide import tile_slide
from cmdfed.data.synth import write_synthetic_store
from cmdfed.progress import Progress


def run_demo(out: str | Path, *, progress: Progress | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = fetch_samples(progress=progress)
    stores = out / "stores"
    slide_info = tile_slide(samples["cmu_small_region.svs"], stores / "slide-unlabelled.zarr", overwrite=True, progress=progress)
    synth_info = write_synthetic_store(stores / "synthetic-labelled.zarr", 64, site=0, seed=0, overwrite=True, progress=progress)
    return {
        "out": str(out.resolve()),
        "samples": {name: str(path) for name, path in samples.items()},
        "stores": {"slide": slide_info.to_dict(), "synthetic": synth_info.to_dict()},
    }
