"""Cost of local differential privacy: a site's local step with and without DP-SGD (Opacus).

In process, no Flower: a site's round is ``cmdfed.federation.local.local_pretrain_round`` /
``local_finetune_round`` on a synthetic store, exactly what the ClientApp calls; with DP it
gets a ``PrivacyLedger`` (``open_privacy_ledger``, the run's noise for an epsilon-8 budget), so
the round runs DP-SGD (``cmdfed.privacy.dpsgd``: per-tile gradients by Opacus's
``GradSampleModule``, clipping, noise). Each configuration runs in a fresh process (so peak
RSS is its own): a 1-step warm-up round, then a measured round of ``--steps`` steps; the
step time is that round's ``train_seconds`` / steps (Opacus's per-round hooking included).

    python -m benchmarks.federation_dp [--tile 256] [--batch 8] [--steps 3] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import save

PRESETS = ("tiny", "base")
PHASES = ("pretrain", "finetune")


def child(preset: str, phase: str, dp: bool, tile: int, batch: int, steps: int) -> dict:
    """One configuration (in its own process): warm-up round, measured round."""
    import torch

    from benchmarks.federation_common import CLASSES
    from cmdfed.data.synth import write_synthetic_store
    from cmdfed.federation.config import FederationConfig
    from cmdfed.federation.local import local_finetune_round, local_pretrain_round, open_privacy_ledger
    from cmdfed.model.unet import ConvNeXtUNet, build_model

    with tempfile.TemporaryDirectory(prefix="cmdfed-bench-") as tmp:
        store = Path(tmp) / "site.zarr"
        write_synthetic_store(store, 4 * batch, tile_size=tile)
        config = FederationConfig(
            preset=preset,
            classes=CLASSES,
            local_steps=steps,
            batch_size=batch,
            augment=False,
            pretrain_rounds=2,
            finetune_rounds=2,
            dp_mode="local" if dp else "off",
        )
        torch.manual_seed(0)
        state = build_model(config.model_config(phase)).state_dict()
        sent = {k: v for k, v in state.items() if ConvNeXtUNet.group_of(k) in config.sent_groups(phase)}
        frozen = {k: v for k, v in state.items() if ConvNeXtUNet.group_of(k) in config.frozen_groups(phase)}
        ledger = open_privacy_ledger(config, store, Path(tmp) / "work", "benchmark", batch) if dp else None

        def local_round(run_config: FederationConfig, round: int) -> dict[str, float]:
            options = {"device": "cpu", "ledger": ledger}
            if phase == "pretrain":
                return local_pretrain_round(sent, store, run_config, round, "site-a", **options).metrics
            return local_finetune_round(sent, frozen, store, run_config, round, "site-a", **options).metrics

        local_round(dataclasses.replace(config, local_steps=1), 1)  # warm-up
        metrics = local_round(config, 2)
    return {
        "step_s": metrics["train_seconds"] / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "noise_multiplier": ledger.noise_multiplier if ledger else None,
    }


def measure(preset: str, phase: str, dp: bool, tile: int, batch: int, steps: int) -> dict:
    args = [preset, phase, "dp" if dp else "plain", str(tile), str(batch), str(steps)]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.federation_dp", "--child", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--quick", action="store_true", help="tiny preset, 64 px, batch 2, 1 step")
    parser.add_argument(
        "--child", nargs=6, metavar=("PRESET", "PHASE", "DP", "TILE", "BATCH", "STEPS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        preset, phase, dp, tile, batch, steps = args.child
        print(json.dumps(child(preset, phase, dp == "dp", int(tile), int(batch), int(steps))))
        return
    if args.quick:
        args.presets, args.tile, args.batch, args.steps = ["tiny"], 64, 2, 1
    rows = []
    for preset in args.presets:
        for phase in PHASES:
            plain = measure(preset, phase, False, args.tile, args.batch, args.steps)
            private = measure(preset, phase, True, args.tile, args.batch, args.steps)
            rows.append(
                {
                    "preset": preset,
                    "phase": phase,
                    "step s": round(plain["step_s"], 3),
                    "DP step s": round(private["step_s"], 3),
                    "DP / plain": round(private["step_s"] / plain["step_s"], 2),
                    "peak RSS MB": round(plain["peak_rss_mb"]),
                    "DP peak RSS MB": round(private["peak_rss_mb"]),
                    "noise multiplier": round(private["noise_multiplier"], 3),
                }
            )
    save(
        "federation_dp",
        rows,
        notes=(
            f"batch {args.batch}, {args.tile} px synthetic tiles, CPU; step time = train_seconds / {args.steps} of a "
            f"{args.steps}-step local round after a 1-step warm-up round (the round's Opacus hooking included). "
            "Fine-tuning trains the heads over the frozen backbone, so only the heads need per-tile gradients. "
            "Noise multiplier: what the ledger picks for epsilon 8, delta 1e-5 over the planned 2+2 rounds."
        ),
    )


if __name__ == "__main__":
    main()
