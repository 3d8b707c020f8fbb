"""Round overhead of a real federation on loopback: round wall time minus the slowest site's
local compute, with 2 and 4 SuperNodes, in both SuperNode isolation modes.

Each configuration is a fresh federation (``benchmarks.federation_common``: SuperLink,
SuperNodes, ``cmdfed federate``; tiny preset, 64 px synthetic tiles, no evaluation rounds).
A round's wall time is the telemetry round row's ``finished_at - started_at`` (the ServerApp
from sending the round's messages to its checkpoint and records); the slowest site's
compute is the largest ``train_seconds`` among the round's sites. The rest is overhead:
Flower's message relay (SuperNodes poll the SuperLink every 3 s, the ServerApp polls for
replies every 3 s), starting the ClientApp process of each message, moving the weights,
aggregation, checkpoint and telemetry.

Isolation ``subprocess`` is Flower's default: a fresh ``flwr-clientapp`` process per message,
which imports Flower, torch, Opacus and cmdfed each time. ``process`` is cmdfed's warm
launcher (``client/launcher.py``): imported once per site, one forked process per message.

    python -m benchmarks.federation_overhead [--sites 2 4] [--rounds 2] [--local-steps 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import save
from benchmarks.federation_common import add_round_options, round_overheads, round_settings, run_federation
from client.supernode import ISOLATION_MODES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_round_options(parser, sites=[2, 4], tiles=8)
    parser.add_argument("--quick", action="store_true", help="2 sites, 1 round of each phase, 1 local step")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds, args.local_steps = [2], 1, 1
    settings = [*round_settings(args), "augment=false"]
    rows = []
    for n_sites in args.sites:
        for isolation in ISOLATION_MODES:
            with tempfile.TemporaryDirectory(prefix="cmdfed-bench-") as tmp:
                federation = run_federation(Path(tmp), n_sites, settings, isolation=isolation, tiles=args.tiles)
            per_round = round_overheads(federation)
            for phase in ("pretrain", "finetune"):
                mine = [r for r in per_round if r["phase"] == phase]
                rows.append(
                    {
                        "isolation": isolation,
                        "sites": n_sites,
                        "phase": phase,
                        "rounds": len(mine),
                        "round s (median)": round(statistics.median(r["wall_s"] for r in mine), 1),
                        "slowest site compute s": round(statistics.median(r["compute_s"] for r in mine), 1),
                        "overhead s": round(statistics.median(r["overhead_s"] for r in mine), 1),
                        "overhead s (max)": round(max(r["overhead_s"] for r in mine), 1),
                        "federate wall s": round(federation.wall_s),
                    }
                )
    save(
        "federation_overhead",
        rows,
        notes=(
            f"tiny preset, {args.tiles} synthetic 64 px tiles per site, {args.local_steps} local steps of batch "
            f"{args.batch}, {args.rounds} round(s) per phase, no evaluation rounds; every process on 127.0.0.1 of this "
            "machine, so sites compete for its cores. Overhead = round wall time - slowest site's train_seconds "
            "(median over the phase's rounds; the first fine-tuning round also carries the frozen backbone). "
            "'federate wall s' is the whole run, both phases, including the ServerApp's start."
        ),
    )


if __name__ == "__main__":
    main()
