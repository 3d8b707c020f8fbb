"""Training-step throughput and memory of CMD on this CPU, against a reference U-Net.

For each preset (tiny, base) at 256 px, batch 8, in a fresh process each (so peak RSS is
that configuration's own): images/s of a masked-diffusion pretraining step and of a
head fine-tuning step (frozen backbone); FLOPs per step counted by
``torch.utils.flop_counter``; achieved GFLOP/s against this CPU's measured matmul peak
(a 4096^2 fp32 torch matmul); and the step time of MONAI's ``FlexibleUNet`` with a
ResNet-34 encoder (random init, same input, MSE loss, full backward) as a ratio.

    python -m benchmarks.model_throughput [--batch 8] [--tile 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from benchmarks.common import save

CHILD = r"""
import json, resource, sys, time, torch
from torch.utils.flop_counter import FlopCounterMode
preset, phase, batch, tile, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
x = torch.rand(batch, 3, tile, tile) * 2 - 1
if preset == "monai-flexibleunet-resnet34":
    from monai.networks.nets import FlexibleUNet
    model = FlexibleUNet(in_channels=4, out_channels=3, backbone="resnet34", pretrained=False, spatial_dims=2)
    inp = torch.cat([x, torch.zeros(batch, 1, tile, tile)], 1)
    def step():
        loss = ((model(inp) - x) ** 2).mean()
        loss.backward()
        return loss
    params = model.parameters()
else:
    from cmdfed.model.config import ModelConfig, DiffusionConfig
    from cmdfed.model.unet import build_model
    from cmdfed.model.diffusion import MaskedDiffusion
    from cmdfed.model.losses import hovernet_loss
    from cmdfed.model.targets import make_targets
    from cmdfed.data.synth import synth_tiles
    model = build_model(ModelConfig.from_preset(preset, n_classes=4 if phase == "finetune" else 0))
    if phase == "pretrain":
        diffusion = MaskedDiffusion(DiffusionConfig())
        def step():
            loss = diffusion.training_loss(model, x).loss
            loss.backward()
            return loss
    else:
        model.freeze(("backbone", "modulation"))
        tiles = list(synth_tiles(batch, tile))
        t = [make_targets(s.instances, s.types) for s in tiles]
        targets = {"np": torch.stack([torch.from_numpy(a.nuclear_pixels) for a in t]),
                   "hv": torch.stack([torch.from_numpy(a.hv) for a in t]),
                   "nc": torch.stack([torch.from_numpy(a.nuclear_types) for a in t])}
        def step():
            loss, _ = hovernet_loss(model.segment(x), targets)
            loss.backward()
            return loss
    params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
def train_step():
    opt.zero_grad(set_to_none=True)
    step()
    opt.step()
with FlopCounterMode(display=False) as counter:
    train_step()
flops = counter.get_total_flops()
train_step()  # warm-up
times = []
for _ in range(steps):
    start = time.perf_counter(); train_step(); times.append(time.perf_counter() - start)
times.sort()
median = times[len(times) // 2]
print(json.dumps({"seconds": median, "flops": flops,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure(preset: str, phase: str, batch: int, tile: int, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, preset, phase, str(batch), str(tile), str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    peak = matmul_peak_gflops()
    reference = measure("monai-flexibleunet-resnet34", "train", args.batch, args.tile, args.steps)
    rows = []
    for preset in ("tiny", "base"):
        for phase in ("pretrain", "finetune"):
            m = measure(preset, phase, args.batch, args.tile, args.steps)
            gflops = m["flops"] / m["seconds"] / 1e9
            rows.append(
                {
                    "model": f"CMD {preset}",
                    "phase": phase,
                    "params M": round(m["params"] / 1e6, 2),
                    "images/s": round(args.batch / m["seconds"], 2),
                    "step s": round(m["seconds"], 3),
                    "GFLOP/step": round(m["flops"] / 1e9, 1),
                    "GFLOP/s": round(gflops, 1),
                    "% of matmul peak": round(100 * gflops / peak, 1),
                    "peak RSS MB": round(m["peak_rss_mb"]),
                    "step time / FlexibleUNet-R34": round(m["seconds"] / reference["seconds"], 2),
                }
            )
    ref_gflops = reference["flops"] / reference["seconds"] / 1e9
    rows.append(
        {
            "model": "MONAI FlexibleUNet ResNet-34",
            "phase": "train (full backward)",
            "params M": round(reference["params"] / 1e6, 2),
            "images/s": round(args.batch / reference["seconds"], 2),
            "step s": round(reference["seconds"], 3),
            "GFLOP/step": round(reference["flops"] / 1e9, 1),
            "GFLOP/s": round(ref_gflops, 1),
            "% of matmul peak": round(100 * ref_gflops / peak, 1),
            "peak RSS MB": round(reference["peak_rss_mb"]),
            "step time / FlexibleUNet-R34": 1.0,
        }
    )
    save(
        "model_throughput",
        rows,
        notes=f"batch {args.batch}, {args.tile} px, median of {args.steps} steps; "
        f"fp32 matmul peak {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)",
    )


if __name__ == "__main__":
    main()
