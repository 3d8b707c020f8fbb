"""Training-step throughput of CMD on this CPU: the product's training step in fp32 and in bf16.

Each configuration runs in a fresh process (so peak RSS is its own) through the trainer that
``cmdfed train`` and the federated rounds use (``cmdfed.train.loop.Trainer`` with the phases'
losses: AdamW, LR schedule, gradient clipping, channels-last tensors), at 256 px, batch 8:

* ``pretrain``: a masked-diffusion pretraining step;
* ``finetune``: a fine-tuning step of the heads over the frozen backbone;
* ``finetune (all)``: an end-to-end fine-tuning step (the default recipe's).

Precisions: ``fp32`` and ``bf16`` autocast (``TrainConfig.precision``; on this CPU ``auto`` is
bf16, see ``cmdfed/train/device.py``). FLOPs per step are counted once by
``torch.utils.flop_counter`` (the same in either precision) and the achieved FLOP/s is given
against the matmul peak **of the precision used** (a 4096^2 torch matmul in fp32 and in bf16,
measured in the same run). MONAI's ``FlexibleUNet`` with a ResNet-34 encoder (fp32, full
backward) is the reference step.

``--baseline COMMIT`` also runs that commit's own ``benchmarks.model_throughput`` from a
temporary git worktree, in the same run, and lists its images/s beside today's (rows with
``code = COMMIT``): the before-and-after of one command.

    python -m benchmarks.model_throughput [--batch 8] [--tile 256] [--steps 5] [--presets tiny base]
        [--baseline 4fcabbc]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import save

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("pretrain", "finetune", "finetune (all)")
REFERENCE = "monai-flexibleunet-resnet34"
COMPILED = "+compile"  # a precision with it: the model's graph compiled by torch.compile (inductor)


def _reference_step(batch: int, tile: int):
    from monai.networks.nets import FlexibleUNet

    model = FlexibleUNet(in_channels=4, out_channels=3, backbone="resnet34", pretrained=False, spatial_dims=2)
    x = torch.rand(batch, 3, tile, tile) * 2 - 1
    inp = torch.cat([x, torch.zeros(batch, 1, tile, tile)], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        ((model(inp) - x) ** 2).mean().backward()
        opt.step()

    return model, step


def _cmd_step(preset: str, phase: str, precision: str, batch: int, tile: int):
    from cmdfed.data.synth import synth_tiles
    from cmdfed.model.config import DiffusionConfig, ModelConfig
    from cmdfed.model.diffusion import MaskedDiffusion
    from cmdfed.model.targets import make_targets
    from cmdfed.model.unet import build_model
    from cmdfed.train.device import memory_format
    from cmdfed.train.loop import TrainConfig, Trainer
    from cmdfed.train.phases import finetune_loss, pretrain_loss

    device = torch.device("cpu")
    config = TrainConfig(steps=1000, batch_size=batch, lr=1e-4, precision=precision.removesuffix(COMPILED))
    tiles = list(synth_tiles(batch, tile))
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float().div(255.0) for s in tiles])
    if phase == "pretrain":
        model = build_model(ModelConfig.from_preset(preset)).to(device, memory_format=memory_format(device))
        loss = pretrain_loss(model, MaskedDiffusion(DiffusionConfig()), None)
        batch_dict = {"image": images}
    else:
        model = build_model(ModelConfig.from_preset(preset, n_classes=4)).to(
            device, memory_format=memory_format(device)
        )
        if phase == "finetune":
            model.freeze(("backbone", "modulation"))
        targets = [make_targets(s.instances, s.types) for s in tiles]
        batch_dict = {
            "image": images,
            "np": torch.stack([torch.from_numpy(t.nuclear_pixels) for t in targets]),
            "hv": torch.stack([torch.from_numpy(t.hv) for t in targets]),
            "nc": torch.stack([torch.from_numpy(t.nuclear_types) for t in targets]),
        }
        loss = finetune_loss(model, None)
    trainer = Trainer(model, loss, config, device)

    def compile_model() -> None:  # what the phase's loss calls: the forward pass, or the segmentation one
        name = "forward" if phase == "pretrain" else "segment"
        setattr(model, name, torch.compile(getattr(model, name)))

    return model, lambda: trainer.train_step(batch_dict), compile_model


def child(preset: str, phase: str, precision: str, batch: int, tile: int, steps: int) -> dict:
    """One configuration's median step time, FLOPs and peak RSS (run in a fresh process)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    if preset == REFERENCE:
        model, step = _reference_step(batch, tile)
    else:
        model, step, compile_model = _cmd_step(preset, phase, precision, batch, tile)
    with FlopCounterMode(display=False) as counter:
        step()
    if precision.endswith(COMPILED):
        compile_model()  # after counting: the counter sees the eager graph, the same FLOPs
    start = time.perf_counter()
    step()  # warm-up: oneDNN picks its kernels for the layout and precision here (inductor compiles)
    warm_up = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "seconds": times[len(times) // 2],
        "flops": counter.get_total_flops(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in model.parameters()),
        "warm_up_s": warm_up,
    }


def matmul_peak_gflops(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure(preset: str, phase: str, precision: str, batch: int, tile: int, steps: int) -> dict:
    args = [preset, phase, precision, str(batch), str(tile), str(steps)]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.model_throughput", "--child", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rows(commit: str, batch: int, tile: int, steps: int) -> list[dict]:
    """``commit``'s own benchmark, run from a temporary worktree, as rows keyed like today's."""
    with tempfile.TemporaryDirectory(prefix="cmdfed-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=ROOT, check=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            command = [
                sys.executable,
                "-m",
                "benchmarks.model_throughput",
                "--batch",
                str(batch),
                "--tile",
                str(tile),
                "--steps",
                str(steps),
            ]
            subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True, text=True)
            rows = json.loads((tree / "benchmarks/results/model_throughput.json").read_text())["rows"]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    return [
        {
            "code": commit,
            "model": r["model"],
            "phase": r["phase"],
            "precision": "fp32",
            "images/s": r["images/s"],
            "step s": r["step s"],
        }
        for r in rows
    ]


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        preset, phase, precision, batch, tile, steps = sys.argv[2:8]
        print(json.dumps(child(preset, phase, precision, int(batch), int(tile), int(steps))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--baseline", default=None, help="a commit whose benchmark runs beside today's")
    parser.add_argument("--compile", action="store_true", help="also time bf16 steps under torch.compile")
    args = parser.parse_args()
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    baseline = baseline_rows(args.baseline, args.batch, args.tile, args.steps) if args.baseline else []
    reference = measure(REFERENCE, "train", "fp32", args.batch, args.tile, args.steps)
    code = "today"
    rows = []

    def row(model: str, phase: str, precision: str, m: dict) -> dict:
        gflops = m["flops"] / m["seconds"] / 1e9
        before = next((b for b in baseline if b["model"] == model and b["phase"] == phase), None)
        return {
            "code": code,
            "model": model,
            "phase": phase,
            "precision": precision,
            "params M": round(m["params"] / 1e6, 2),
            "images/s": round(args.batch / m["seconds"], 2),
            "step s": round(m["seconds"], 3),
            "GFLOP/step": round(m["flops"] / 1e9, 1),
            "GFLOP/s": round(gflops, 1),
            "% of matmul peak": round(100 * gflops / peaks[precision.removesuffix(COMPILED)], 1),
            "warm-up s": round(m.get("warm_up_s", 0.0), 1),
            "peak RSS MB": round(m["peak_rss_mb"]),
            "x baseline": round(before["step s"] / m["seconds"], 2) if before else "",
        }

    for preset in args.presets:
        for phase in PHASES:
            for precision in ("fp32", "bf16", *(["bf16" + COMPILED] if args.compile else [])):
                rows.append(
                    row(
                        f"CMD {preset}",
                        phase,
                        precision,
                        measure(preset, phase, precision, args.batch, args.tile, args.steps),
                    )
                )
    rows.append(row("MONAI FlexibleUNet ResNet-34", "train (full backward)", "fp32", reference))
    for before in baseline:
        rows.append({key: before.get(key, "") for key in rows[0]})
    notes = (
        f"batch {args.batch}, {args.tile} px, median of {args.steps} steps after one warm-up, "
        f"{torch.get_num_threads()} threads; matmul peak fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s; "
        f"'% of matmul peak' is against the peak of the row's precision; "
        + (
            f"rows with code {args.baseline} are that commit's own benchmark (fp32, channels-first, the model's "
            f"step without the trainer), run in the same session; 'x baseline' = its step time / today's"
            if args.baseline
            else "no baseline run"
        )
    )
    save("model_throughput", rows, notes=notes)


if __name__ == "__main__":
    main()
