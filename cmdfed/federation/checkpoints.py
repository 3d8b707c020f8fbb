"""The run folder's round checkpoints, and finding where to resume.

After every round the server writes ``RUN_DIR/round-NNNN/`` (rounds numbered through the
run: fine-tuning continues after pretraining)::

    round-0003/
      model.safetensors      the global model, all groups (heads too, before fine-tuning)
      strategy.safetensors   the strategy's state (FedAdam/FedYogi moments), when it has one
      config.json            phase, round in phase, model config, class names, run config,
                             the round's metrics, the phase's training resolution (mpp, when
                             the sites agreed on one), the init it started from; cmdfed
                             checkpoint format

The folder is written under a temporary name and renamed, then ``RUN_DIR/latest`` is
replaced, both atomically: a crash leaves either the whole round or none of it. A round
folder is therefore complete exactly when it loads, and a restarted server resumes after
the last one that does. It is an ordinary cmdfed checkpoint too, so ``cmdfed predict
--checkpoint RUN_DIR`` and ``cmdfed train evaluate`` read it as they read local runs.

Retention (``keep-rounds`` in the run config, 0 = keep every round, else at least 2 so a
damaged newest round still has one before it): after each round the folders older than the
newest N are deleted, except the last pretraining round, the pretrained backbone that
fine-tuning starts from (a base-preset round is about 130 MB). A folder that cannot be
deleted is left with a warning: retention never fails a round.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cmdfed.atomic import atomic_dir, write_bytes_atomic, write_json_atomic
from cmdfed.errors import CmdfedError
from cmdfed.federation.events import emit_event
from cmdfed.model.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointFormatError,
    load_checkpoint,
    verify_files,
    write_checksums,
)

ROUND_PATTERN = re.compile(r"round-(\d{4,})")
STRATEGY_FILE = "strategy.safetensors"


@dataclass
class RoundCheckpoint:
    path: Path
    round: int  # through the run
    phase: str
    phase_round: int
    weights: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]
    metrics: dict
    config: dict = field(default_factory=dict)  # the whole config.json (training resolution, init, ...)


def round_name(round: int) -> str:
    return f"round-{round:04d}"


def save_round(
    run_dir: str | Path,
    *,
    round: int,
    phase: str,
    phase_round: int,
    weights: dict[str, torch.Tensor],
    strategy_state: dict[str, torch.Tensor],
    config: dict,
    metrics: dict,
) -> Path:
    """Write ``run_dir/round-NNNN`` atomically and point ``run_dir/latest`` at it.

    ``config`` carries what a reader of the checkpoint needs besides the round (model
    config, class names, the run's settings).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / round_name(round)
    # Replacing an existing folder covers a round redone after a crash between rename and `latest`.
    with atomic_dir(final) as tmp:
        save_file(_cpu(weights), str(tmp / "model.safetensors"))
        if strategy_state:
            save_file(_cpu(strategy_state), str(tmp / STRATEGY_FILE))
        write_json_atomic(
            tmp / "config.json",
            {
                **config,
                "phase": phase,
                "phase_round": phase_round,
                "round": round,
                "step": round,
                "metrics": metrics,
                "strategy_state": bool(strategy_state),
                "format": CHECKPOINT_FORMAT,
            },
        )
        write_checksums(tmp)  # verified on load (cmdfed.model.checkpoint)
    write_bytes_atomic(run_dir / "latest", final.name.encode())
    return final


def load_round(path: str | Path) -> RoundCheckpoint:
    checkpoint = load_checkpoint(path)
    config = checkpoint.config
    for key in ("phase", "phase_round", "round"):
        if key not in config:
            raise CmdfedError(f"{checkpoint.path} is a checkpoint but not a federated round (no {key})")
    strategy_state: dict[str, torch.Tensor] = {}
    if config.get("strategy_state"):
        strategy_path = checkpoint.path / STRATEGY_FILE
        if not strategy_path.is_file():
            raise CmdfedError(f"{strategy_path} is missing; the round checkpoint is incomplete")
        verify_files(checkpoint.path, [STRATEGY_FILE])
        strategy_state = _load_tensors(strategy_path)
    return RoundCheckpoint(
        checkpoint.path,
        int(config["round"]),
        str(config["phase"]),
        int(config["phase_round"]),
        checkpoint.weights,
        strategy_state,
        dict(config.get("metrics") or {}),
        dict(config),
    )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CmdfedError(f"{path} is damaged or not a safetensors file ({exc})") from exc


def last_complete_round(run_dir: str | Path) -> RoundCheckpoint | None:
    """The newest round folder of ``run_dir`` that loads, or None for a new run.

    Folders that do not load (a disk that lost data) are passed over for the one before; a
    round written by another checkpoint format is an error (resuming before it would redo rounds).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    rounds = sorted(
        (int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := ROUND_PATTERN.fullmatch(p.name))
    )
    for _, path in reversed(rounds):
        try:
            return load_round(path)
        except CheckpointFormatError:
            raise
        except CmdfedError:
            continue
    return None


def prune_rounds(run_dir: str | Path, keep: int, protected: Collection[int] = ()) -> list[int]:
    """Delete the round folders older than the newest ``keep`` (0 = none), except ``protected``
    rounds; returns the rounds deleted. Unfinished temporary folders are not touched."""
    if keep <= 0:
        return []
    run_dir = Path(run_dir)
    rounds = sorted(int(m.group(1)) for p in run_dir.iterdir() if p.is_dir() and (m := ROUND_PATTERN.fullmatch(p.name)))
    deleted = []
    for round in (r for r in rounds[:-keep] if r not in protected):
        try:
            shutil.rmtree(run_dir / round_name(round))
            deleted.append(round)
        except OSError as exc:
            emit_event(
                "warning", message=f"could not delete old round checkpoint {round_name(round)} ({exc}); left in place"
            )
    return deleted


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).detach().to("cpu").contiguous() for k, v in tensors.items()}
