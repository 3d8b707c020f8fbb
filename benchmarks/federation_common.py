"""A real federation on 127.0.0.1 for the federation benchmarks, and what its telemetry recorded.

As ``tests/e2e/test_federation.py`` drives one: a SuperLink (``server.superlink``), one
SuperNode per site (``client.supernode``) on a synthetic store of its own, and
``cmdfed federate`` as a subprocess, as a user runs it. The rounds are then read back from
the run's telemetry store (``RUN_DIR/telemetry.db``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client.supernode import SuperNode
from cmdfed.data.synth import CLASS_NAMES, write_synthetic_store
from cmdfed.federation.processes import federate_command, free_port
from cmdfed.federation.site import SiteSettings
from cmdfed.telemetry import TelemetryStore
from server.superlink import SuperLink

CLASSES = ",".join(CLASS_NAMES[1:])


def add_round_options(parser: argparse.ArgumentParser, *, sites: list[int], tiles: int) -> None:
    """The options every federation benchmark takes: how many sites, rounds and steps."""
    parser.add_argument("--sites", type=int, nargs="+", default=sites)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each phase")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tiles", type=int, default=tiles, help="tiles per site (64 px)")


def round_settings(args: argparse.Namespace) -> list[str]:
    """``cmdfed federate --set`` settings of those options: the tiny preset, no evaluation."""
    return [
        "preset=tiny",
        f"pretrain-rounds={args.rounds}",
        f"finetune-rounds={args.rounds}",
        f"local-steps={args.local_steps}",
        f"batch-size={args.batch}",
        "eval-every=0",
    ]


@dataclass
class Federation:
    rounds: list[
        dict
    ]  # telemetry rows: phase, round, started_at, finished_at, bytes_sent, bytes_received, n_sites, ...
    sites: list[dict]  # telemetry site rows: phase, round, site, status, metrics (train_seconds, ...)
    wall_s: float  # `cmdfed federate` from submission to exit


def run_federation(
    work: Path, n_sites: int, settings: list[str], *, isolation: str = "subprocess", tiles: int = 8, tile_size: int = 64
) -> Federation:
    """Start a SuperLink and ``n_sites`` SuperNodes, run ``cmdfed federate --set ...``, stop them."""
    sites = []
    for k in range(n_sites):
        write_synthetic_store(work / f"site{k}.zarr", tiles, site=k, seed=k, tile_size=tile_size)
        sites.append(SiteSettings(work / f"site{k}.zarr", f"site-{k}", work / f"work{k}", device="cpu"))
    run_dir = work / "run"
    superlink = SuperLink(run_dir, port=free_port()).start()
    nodes: list[SuperNode] = []
    try:
        for site in sites:
            nodes.append(SuperNode(site, superlink.address, isolation=isolation).start())
        settings = [f"min-sites={n_sites}", f'classes="{CLASSES}"', *settings]
        command = [sys.executable, "-m", "cmdfed", *federate_command(superlink.address, run_dir, settings)]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    finally:
        for node in nodes:
            node.stop()
        superlink.stop()
    if result.returncode != 0:
        raise RuntimeError(
            f"cmdfed federate failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    with TelemetryStore.open(run_dir / "telemetry.db", readonly=True) as store:
        (run,) = store.runs()
        return Federation(store.rounds(run["run_id"]), store.site_rounds(run["run_id"]), wall)


def round_overheads(federation: Federation) -> list[dict]:
    """Per round: wall time, the slowest trained site's local compute (its ``train_seconds``), and
    the difference: what the round costs beyond training (messages, process start, aggregation,
    checkpoint, telemetry)."""
    out = []
    for row in federation.rounds:
        trained = [s for s in federation.sites if s["round"] == row["round"] and s["status"] == "trained"]
        wall = row["finished_at"] - row["started_at"]
        compute = max(s["metrics"]["train_seconds"] for s in trained)
        out.append(
            {
                "phase": row["phase"],
                "round": row["round"],
                "wall_s": wall,
                "compute_s": compute,
                "overhead_s": wall - compute,
            }
        )
    return out
