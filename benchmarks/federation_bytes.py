"""Bytes per round and site in each phase, as a ratio of the full model's fp32 size.

*Measured* (tiny preset): real federations on loopback (``benchmarks.federation_common``;
1 local step): one of 1 pretraining and 2 fine-tuning rounds of the heads, then one of 2
fine-tuning rounds (no pretraining) for each other ``finetune-trainable`` choice
(``heads+modulation``, ``all``); their telemetry rounds' ``bytes_sent`` and
``bytes_received`` (the ServerApp's count of the messages' serialised arrays and records)
divided by the round's sites. *Computed* (tiny and base, every fine-tuning choice): which
parameter groups travel (``FederationConfig.sent_groups``, and the frozen
groups a fine-tuning site is sent once, ``frozen_groups``) times 4 bytes per value; no
training needed. The full model's fp32 size is its parameter count times 4 bytes.

    python -m benchmarks.federation_bytes [--sites 2] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import save
from benchmarks.federation_common import CLASSES, run_federation
from cmdfed.federation.config import FINETUNE_TRAINABLE, FederationConfig
from cmdfed.model.unet import ConvNeXtUNet, build_model


def full_fp32_bytes(config: FederationConfig) -> int:
    return 4 * sum(p.numel() for p in build_model(config.model_config("pretrain")).parameters())


def groups_bytes(config: FederationConfig, groups: tuple[str, ...]) -> int:
    state = build_model(config.model_config("pretrain")).state_dict()
    return 4 * sum(v.numel() for k, v in state.items() if ConvNeXtUNet.group_of(k) in groups)


def computed_rows(preset: str) -> list[dict]:
    rows = []
    for trainable in FINETUNE_TRAINABLE:
        config = FederationConfig(preset=preset, classes=CLASSES, finetune_trainable=trainable)
        full = full_fp32_bytes(config)
        cases = [
            ("pretrain", "every round", config.sent_groups("pretrain"), config.sent_groups("pretrain")),
            (
                f"finetune ({trainable})",
                "first round",
                config.sent_groups("finetune") + config.frozen_groups("finetune"),
                config.sent_groups("finetune"),
            ),
            (f"finetune ({trainable})", "later rounds", config.sent_groups("finetune"), config.sent_groups("finetune")),
        ]
        for phase, which, down, up in cases:
            if phase == "pretrain" and trainable != FINETUNE_TRAINABLE[0]:
                continue  # pretraining does not depend on the fine-tuning choice
            rows.append(
                _row(preset, "computed", phase, which, groups_bytes(config, down), groups_bytes(config, up), full)
            )
    return rows


def measured_rows(sites: int, rounds: int) -> list[dict]:
    """One federation per fine-tuning choice; the heads' run also pretrains for a round."""
    config = FederationConfig(preset="tiny", classes=CLASSES)
    full = full_fp32_bytes(config)
    rows = []
    for trainable in FINETUNE_TRAINABLE:
        pretrain_rounds = 1 if trainable == FINETUNE_TRAINABLE[0] else 0
        settings = [
            "preset=tiny",
            f"pretrain-rounds={pretrain_rounds}",
            f"finetune-rounds={rounds}",
            "local-steps=1",
            "batch-size=2",
            "eval-every=0",
            "augment=false",
            f'finetune-trainable="{trainable}"',
        ]
        with tempfile.TemporaryDirectory(prefix="cmdfed-bench-") as tmp:
            federation = run_federation(Path(tmp), sites, settings, isolation="process", tiles=4)
        for r in federation.rounds:
            phase_round = r["round"] - pretrain_rounds * (r["phase"] == "finetune")
            which = (
                "every round"
                if r["phase"] == "pretrain"
                else "first round"
                if phase_round == 1
                else f"round {phase_round}"
            )
            phase = r["phase"] if r["phase"] == "pretrain" else f"finetune ({trainable})"
            rows.append(
                _row(
                    "tiny",
                    "measured",
                    phase,
                    which,
                    r["bytes_sent"] / r["n_sites"],
                    r["bytes_received"] / r["n_sites"],
                    full,
                )
            )
    return rows


def _row(preset: str, source: str, phase: str, which: str, down: float, up: float, full: int) -> dict:
    return {
        "preset": preset,
        "source": source,
        "phase": phase,
        "round": which,
        "full model fp32 MB": round(full / 1e6, 2),
        "to a site MB": round(down / 1e6, 3),
        "from a site MB": round(up / 1e6, 3),
        "to a site / full": round(down / full, 4),
        "from a site / full": round(up / full, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--finetune-rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="computed rows only (no federation)")
    args = parser.parse_args()
    rows = [] if args.quick else measured_rows(args.sites, args.finetune_rounds)
    rows += computed_rows("tiny") + computed_rows("base")
    save(
        "federation_bytes",
        rows,
        notes=(
            "Per site and round. 'to a site' = what the ServerApp sends one site, 'from a site' = its reply. "
            "Fine-tuning sends the frozen groups (backbone, and modulation unless trained) once per site and phase, "
            "with its first round; later rounds carry the trained groups only; 'all' (end to end) freezes nothing, so "
            "every round carries the whole model both ways. Measured = telemetry bytes of real loopback federations, "
            f"one per fine-tuning choice ({args.sites} sites; they include Flower's record keys and the numbers that "
            "travel: layout, model architecture, metrics); computed = 4 bytes per value of the groups that travel."
        ),
    )


if __name__ == "__main__":
    main()
