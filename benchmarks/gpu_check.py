"""The CUDA path of both training phases, for a machine with an NVIDIA GPU.

A few steps of masked-diffusion pretraining and of head fine-tuning on synthetic stores,
with the device chosen automatically (so CUDA, bf16 autocast and channels-last are what
runs), checking that every loss is finite and printing images/s per preset and phase.
Writes results/gpu_check.json. On a CPU-only machine it says so and exits 2.

    python -m benchmarks.gpu_check [--steps 20] [--batch 8] [--tile 256]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import save
from cmdfed.data.synth import write_synthetic_store
from cmdfed.model.config import ModelConfig
from cmdfed.train.device import select_device, use_bf16
from cmdfed.train.loop import TrainConfig
from cmdfed.train.phases import finetune, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tile", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here; run this on a GPU machine", file=sys.stderr)
        sys.exit(2)
    device = select_device("auto")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = write_synthetic_store(Path(tmp) / "site.zarr", 4 * args.batch, tile_size=args.tile).path
        for preset in ("tiny", "base"):
            config = TrainConfig(
                steps=args.steps,
                batch_size=args.batch,
                warmup_steps=2,
                checkpoint_every=args.steps,
                sample_every=args.steps,
            )
            pre = pretrain(
                [store],
                Path(tmp) / f"{preset}-pre",
                model_config=ModelConfig.from_preset(preset),
                train_config=config,
                device="auto",
            )
            fine = finetune(store, Path(tmp) / f"{preset}-ft", init=pre.run_dir, train_config=config, device="auto")
            for phase, result in (("pretrain", pre), ("finetune", fine)):
                losses = [
                    json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
                ]
                rows.append(
                    {
                        "preset": preset,
                        "phase": phase,
                        "device": torch.cuda.get_device_name(device),
                        "bf16": use_bf16(device),
                        "steps": result.steps,
                        "batch": args.batch,
                        "tile": args.tile,
                        "images/s": round(result.images_per_second, 1),
                        "final loss": round(result.final_loss, 4),
                        "all losses finite": all(math.isfinite(v) for v in losses),
                        "peak GPU memory GB": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
                    }
                )
    save("gpu_check", rows, notes="both phases on CUDA with bf16 autocast and channels-last")
    if not all(r["all losses finite"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
