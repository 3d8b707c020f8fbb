"""The edge home the edge benchmarks run on.

``--home DIR``: a workstation home with a deployed bundle (``cmdfed edge export`` of a real
fine-tuned checkpoint, then ``cmdfed edge deploy``): use this for slide and service numbers,
since post-processing time depends on what the model finds. Without it, a model of
``--preset`` with random weights is exported and deployed into a temporary folder: the
network's speed does not depend on its weights, but a random model's nuclei do not look like
real ones, so its post-processing time is only indicative.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

TILE, OVERLAP, MPP = 256, 64, 0.5


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home", type=Path, help="edge home with a deployed bundle (default: export a random-weight --preset model)"
    )
    parser.add_argument(
        "--preset", default=None, help="model preset to export when no --home is given (default base; --quick: tiny)"
    )


def edge_home(args: argparse.Namespace, work: Path, quick_preset: str = "tiny") -> Path:
    """``args.home``, or a temporary home with a random-weight model of ``args.preset`` deployed."""
    if args.home is not None:
        return args.home
    from cmdfed.data.synth import CLASS_NAMES
    from cmdfed.model.checkpoint import save_checkpoint
    from cmdfed.model.config import ModelConfig
    from cmdfed.model.unet import build_model
    from edge.deploy import deploy
    from edge.export import export_bundle

    preset = args.preset or (quick_preset if args.quick else "base")
    config = ModelConfig.from_preset(preset, n_classes=len(CLASS_NAMES))
    run = save_checkpoint(
        work / f"random-{preset}",
        0,
        weights=build_model(config).state_dict(),
        config={"name": f"random-{preset}", "model": config.to_dict(), "class_names": CLASS_NAMES},
    )
    print(f"exporting a random-weight {preset} model (once per run)...", flush=True)
    export_bundle(run, work / "bundle", tile=TILE, overlap=OVERLAP, mpp=MPP)
    deploy(work / "bundle", work / "home")
    return work / "home"


def describe(home: Path) -> str:
    """The served model in a few words, for a result's notes."""
    from edge.deploy import active_bundle

    manifest = json.loads((active_bundle(home) / "manifest.json").read_text())
    model = manifest["model"]
    return (
        f"model {model['version']} ({model['config']['preset']} preset, tile {manifest['preprocessing']['tile_size']} "
        "px)"
    )


def serve(home: Path, *options: str) -> tuple[subprocess.Popen, int]:
    """`cmdfed edge serve --home HOME --port 0 OPTIONS` in its own process, once it serves:
    (the process, the port it chose)."""
    command = [sys.executable, "-m", "cmdfed", "edge", "serve", "--home", str(home), "--port", "0", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while True:
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"the edge service exited before serving (code {process.wait()})")
        started = re.search(r"serving model .* on port (\d+)", line)
        if started:
            break
    # Keep reading its output, so a chatty service never blocks on a full pipe.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, int(started.group(1))
