"""Rounds per hour on Flower's simulation engine with 8, 16 and 32 virtual sites.

Each size is one ``cmdfed simulate`` run, as a user starts it (a subprocess): the real
ServerApp logic and ClientApp handlers on Ray actors, each site on its own synthetic store
(64 px tiles, stain shift by store), each asking Ray for one CPU, so at most as many sites
train at once as this machine has cores. A round's time is the telemetry round row's
``finished_at - started_at``. The run's first round also waits for Ray's workers to start
and import torch and cmdfed, so it is shown apart; rounds per hour = 3600 / the median of
the phase's other rounds. The run's wall time includes starting Ray and writing the stores.

    python -m benchmarks.federation_scaling [--sites 8 16 32] [--rounds 2] [--local-steps 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import save
from benchmarks.federation_common import CLASSES, add_round_options, round_settings
from cmdfed.telemetry import TelemetryStore


def simulate(out: Path, sites: int, tiles: int, settings: list[str]) -> tuple[list[dict], float]:
    sets = [arg for setting in [f'classes="{CLASSES}"', *settings] for arg in ("--set", setting)]
    command = [
        sys.executable,
        "-m",
        "cmdfed",
        "simulate",
        "--sites",
        str(sites),
        "--tiles",
        str(tiles),
        "--out",
        str(out),
        *sets,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"cmdfed simulate --sites {sites} failed "
            f"({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    with TelemetryStore.open(out / "run" / "telemetry.db", readonly=True) as store:
        (run,) = store.runs()
        return store.rounds(run["run_id"]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_round_options(parser, sites=[8, 16, 32], tiles=16)
    parser.add_argument("--quick", action="store_true", help="4 sites, 2 rounds of each phase, 1 local step")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds, args.local_steps = [4], 2, 1
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: the first pretraining round is timed apart")
    settings = round_settings(args)
    rows = []
    for sites in args.sites:
        with tempfile.TemporaryDirectory(prefix="cmdfed-bench-") as tmp:
            rounds, wall = simulate(Path(tmp), sites, args.tiles, settings)
        first, *later = sorted(rounds, key=lambda r: r["round"])
        row = {"sites": sites, "first round s": round(first["finished_at"] - first["started_at"], 1)}
        for phase in ("pretrain", "finetune"):
            seconds = statistics.median(r["finished_at"] - r["started_at"] for r in later if r["phase"] == phase)
            row |= {f"{phase} round s": round(seconds, 1), f"{phase} rounds/h": round(3600 / seconds, 1)}
        rows.append(row | {"simulate wall s": round(wall)})
    save(
        "federation_scaling",
        rows,
        notes=(
            f"cmdfed simulate, tiny preset, {args.tiles} synthetic 64 px tiles per site, {args.local_steps} local "
            f"steps of batch {args.batch}, {args.rounds} round(s) per phase, no evaluation rounds, one Ray CPU per "
            "site. 'first round s' is the run's first pretraining round, which includes starting Ray's workers (their "
            "imports); the phases' round times are medians of the other rounds. 'simulate wall s' is the whole run, "
            "including Ray's start."
        ),
    )


if __name__ == "__main__":
    main()
