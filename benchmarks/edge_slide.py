"""Whole-slide inference speed and peak memory (`cmdfed edge infer`): does memory stay flat as
the slide grows?

Slides, each inferred in its own process (so its peak RSS is its own) with the deployed model:
the real sample SVS through OpenSlide, the same pixels as a pyramidal TIFF, and a 2 x 2 mosaic
of it (4x the area) as a pyramidal TIFF written tile by tile (``benchmarks.slide_tiling``).
Mpx/s counts the whole slide area, background included, as ``slide_tiling`` does; the time is
the whole ``infer_slide`` call (backend load and check, tiles, post-processing, outputs).
Inference holds a few batches in memory whatever the slide size, so the 4x slide's peak RSS
over the 1x TIFF's should stay near 1.

``--baseline DIR``: a checkout of other code (``git worktree add /tmp/wt-base COMMIT``) infers
each slide too, just before this tree does, on the same home and files, so that before and
after are measured in one run under the same load (the notes give the load average).
``--baseline-home`` gives the baseline code a home of its own, for when the export changed
too (the same weights exported by each code).

    python -m benchmarks.edge_slide [--home DIR | --preset base] [--backend NAME] [--batch N] [--threads N]
        [--baseline DIR [--baseline-home DIR]]
    python -m benchmarks.edge_slide --quick   # tiny random model, a 512 px crop of the sample; prints only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tifffile

from benchmarks import edge_home
from benchmarks.common import commit_of, save_or_print
from benchmarks.slide_tiling import write_pyramid
from cmdfed.data.samples import fetch_samples
from cmdfed.data.slide import open_slide

QUICK_CROP = 512
ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from edge.infer import infer_slide
slide, home, out, backend, batch, threads = sys.argv[1:7]
start = time.perf_counter()
batch = {"batch": int(batch)} if batch else {}  # none given: each code's own default
summary = infer_slide(slide, home, out, backend=backend or None, threads=int(threads), **batch)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tiles": summary["tiles"], "n_cells": summary["n_cells"],
                  "dimensions": summary["dimensions"],
                  "backend": summary["backend"]["backend"], "graph": summary["backend"].get("precision"),
                  "timings_s": summary["timings_s"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def crop_of(source: Path, target: Path, side: int) -> Path:
    """A ``side`` px square from the middle of ``source``, as a one-level TIFF with its resolution."""
    with open_slide(source) as reader:
        width, height = reader.dimensions
        image = reader.read_region((width - side) // 2, (height - side) // 2, 0, side, side)
        mpp = reader.mpp
    tifffile.imwrite(target, image, tile=(256, 256), resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return target


def measure(slide: Path, home: Path, out: Path, args: argparse.Namespace, code: Path = ROOT) -> dict:
    """Infer ``slide`` in a child process running the code of the checkout ``code``."""
    command = [
        sys.executable,
        "-c",
        CHILD,
        str(slide),
        str(home),
        str(out),
        args.backend or "",
        str(args.batch or ""),
        str(args.threads),
    ]
    # The child imports from its working folder first, so it runs that checkout's edge.infer.
    env = {**os.environ, "PYTHONPATH": str(code)}
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=code, env=env
    )  # its stderr goes into the error
    if result.returncode != 0:
        raise SystemExit(f"inference of {slide.name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    edge_home.add_options(parser)
    parser.add_argument("--backend", help="force a backend (default: the first that works, as on a workstation)")
    parser.add_argument("--batch", type=int, help="tiles per forward pass (default: each code's own default)")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads for ONNX Runtime"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny random model, a {QUICK_CROP} px crop of the sample; prints, saves nothing",
    )
    parser.add_argument(
        "--baseline", type=Path, help="a checkout of the code to compare with, run just before this tree on each slide"
    )
    parser.add_argument(
        "--baseline-home",
        type=Path,
        help="the edge home the --baseline code runs (default: --home), e.g. its own export of the same weights",
    )
    parser.add_argument(
        "--note", default="", help="said after the measured notes (what was running, how the home was made)"
    )
    args = parser.parse_args()
    codes = [("baseline", args.baseline.resolve()), ("this tree", ROOT)] if args.baseline else [("this tree", ROOT)]
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="cmdfed-bench-"))
    try:
        home = edge_home.edge_home(args, work)
        svs = fetch_samples(names=["cmu_small_region.svs"])["cmu_small_region.svs"]
        if args.quick:
            source = crop_of(svs, work / "crop.tif", QUICK_CROP)
            slides = [("sample crop as pyramid TIFF", work / "x1.tif"), ("4x mosaic pyramid TIFF", work / "x4.tif")]
        else:
            source = svs
            slides = [
                ("sample SVS", svs),
                ("sample as pyramid TIFF", work / "x1.tif"),
                ("4x mosaic pyramid TIFF", work / "x4.tif"),
            ]
        write_pyramid(source, work / "x1.tif", 1)
        write_pyramid(source, work / "x4.tif", 2)
        rows = []
        for name, path in slides:
            for label, code in codes:
                runs_home = args.baseline_home if label == "baseline" and args.baseline_home else home
                m = measure(path, runs_home, work / f"out-{path.stem}-{len(rows)}", args, code)
                width, height = m["dimensions"]
                mpx = width * height / 1e6
                rows.append(
                    {
                        "slide": name,
                        "code": f"{label} {commit_of(code)}",
                        "size": f"{width}x{height}",
                        "megapixels": round(mpx, 1),
                        "tissue tiles": m["tiles"],
                        "nuclei": m["n_cells"],
                        "backend": m["backend"],
                        "graph": m["graph"],
                        "Mpx/s (whole slide)": round(mpx / m["seconds"], 3),
                        "tiles/s": round(m["tiles"] / m["seconds"], 2),
                        "seconds": round(m["seconds"], 1),
                        "model s": round(m["timings_s"]["model"], 1),
                        "post-processing s": round(m["timings_s"]["postprocess"], 1),
                        "peak RSS MB": round(m["peak_rss_mb"]),
                    }
                )
                if args.baseline:  # Mpx/s over the baseline's on the same slide (the row just before; its own: 1)
                    baseline_row = rows[-1] if label == "baseline" else rows[-2]
                    rows[-1]["x baseline"] = round(
                        rows[-1]["Mpx/s (whole slide)"] / baseline_row["Mpx/s (whole slide)"], 2
                    )
        ratios = []
        for label, _ in codes:
            own = [row for row in rows if row["code"].startswith(label)]
            ratios.append(f"{label} {own[-1]['peak RSS MB'] / own[-2]['peak RSS MB']:.2f}")
        notes = (
            f"{edge_home.describe(home)}; batch {args.batch or 'as each code defaults'}, {args.threads} CPU threads; "
            f"peak RSS ratio 4x/1x pyramid TIFF: {', '.join(ratios)}; Mpx/s counts the whole slide area, background "
            "included; the stages' "
            "seconds (model, post-processing) overlap where the code pipelines them; load average (1 / 5 / 15 min) "
            f"{load_before} at the start, {load_average()} at the end" + (f"; {args.note}" if args.note else "")
        )
        save_or_print("edge_slide", rows, notes, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
