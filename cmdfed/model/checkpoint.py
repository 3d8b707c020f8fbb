"""Checkpoints: weights as safetensors, everything else as JSON, written atomically.

A checkpoint is a folder::

    step-000500/
      model.safetensors      the model's weights (what `cmdfed predict` and export read)
      ema.safetensors        exponential moving average of the weights, when enabled
      config.json            model + diffusion + training config, phase, step, metrics
      trainer.pt             optimizer and LR-scheduler state and RNG states, for exact resume
      checksums.json         sha256 and size of each file above but config.json, written last

Weights use safetensors, which cannot execute code when loaded, because checkpoints travel
between hospitals and to scanner workstations. ``trainer.pt`` holds nested optimizer state
that safetensors cannot express; it is read with ``torch.load(weights_only=True)``, which
also refuses code. The folder is written under a temporary name and renamed, and the run
folder's ``latest`` file is replaced atomically after it, so a crash mid-write leaves the
previous checkpoint as the latest.

Weights that do not fit a model are reported the same way wherever they are loaded
(checkpoints, parameter groups, encoder weights): :func:`state_dict_mismatch`.

Every load checks the files it reads against ``checksums.json`` (hashing a checkpoint is
cheap next to training on it): damage on disk (a bit flip, an overwritten block) that would
still parse as tensors is refused with the damaged file's name and the newest earlier
checkpoint of the run that still verifies. Checkpoints written before checksums were
recorded (no ``checksums.json``) load unchecked, as before.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cmdfed.atomic import atomic_dir, write_bytes_atomic, write_json_atomic
from cmdfed.checksums import file_record
from cmdfed.errors import CmdfedError

# 2: the heads normalise each decoder scale (cmdfed/model/heads.py); format-1 heads do not load.
CHECKPOINT_FORMAT = 2
# Formats whose backbone and modulation weights are laid out as now: a fine-tuning run may start
# from them (it replaces the heads), so a costly pretraining survives a change to the heads.
BACKBONE_FORMATS = (1, 2)
CHECKSUMS = "checksums.json"


class CheckpointFormatError(CmdfedError):
    """A readable checkpoint written in another format: not damage, so nothing should pass over it."""


@dataclass
class Checkpoint:
    path: Path
    config: dict
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    trainer: dict | None = field(default=None, repr=False)

    @property
    def step(self) -> int:
        return int(self.config.get("step", 0))


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def model_version(run: str, weights_sha256: str, *, round: int | None = None, step: int = 0) -> str:
    """A model's version: ``<run>-<r<round>|s<step>>-<first 8 hex of the weights' sha256>``.

    The federation server names its final round with it and ``cmdfed edge export`` names a
    bundle with it, so a bundle and the round it came from share one version, two exports of
    the same weights too, and different weights never do.
    """
    tag = f"r{int(round):04d}" if round is not None else f"s{int(step):06d}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{run}-{tag}-{weights_sha256[:8]}").strip("-.")


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    config: dict,
    weights: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None = None,
    trainer: dict | None = None,
    keep_last: int = 3,
) -> Path:
    """Write ``run_dir/step-NNNNNN`` and point ``run_dir/latest`` at it; prune older ones."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / checkpoint_name(step)
    with atomic_dir(final) as tmp:
        save_file(_contiguous(weights), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_contiguous(ema), str(tmp / "ema.safetensors"))
        if trainer is not None:
            torch.save(trainer, tmp / "trainer.pt")
        write_json_atomic(tmp / "config.json", {**config, "step": step, "format": CHECKPOINT_FORMAT})
        write_checksums(tmp)
    write_bytes_atomic(run_dir / "latest", final.name.encode())
    _prune(run_dir, keep_last, protect=final.name)
    return final


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _prune(run_dir: Path, keep_last: int, protect: str) -> None:
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def write_checksums(folder: Path) -> None:
    """Record the sha256 and size of every file in ``folder`` but config.json (which is parsed,
    and read by tools that edit it); call last, when the files are complete."""
    files = {
        p.name: file_record(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in (CHECKSUMS, "config.json")
    }
    write_json_atomic(folder / CHECKSUMS, {"algorithm": "sha256", "files": files})


def _recorded(folder: Path) -> dict | None:
    """The checksums recorded when ``folder`` was written; None for a checkpoint from before they were."""
    path = folder / CHECKSUMS
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if record.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("not a sha256 file list")
        return files
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CmdfedError(f"{path} is damaged ({exc}); {_previous_good_advice(folder)}") from exc


def verify_files(folder: Path, names) -> None:
    """Check the named files of a checkpoint against its recorded checksums (none recorded: no check)."""
    recorded = _recorded(folder)
    if recorded is None:
        return
    for name in names:
        path = folder / name
        if name not in recorded:
            if path.exists():
                raise CmdfedError(f"{path} is not listed in {folder / CHECKSUMS}; {_previous_good_advice(folder)}")
            continue
        if not path.is_file():
            raise CmdfedError(f"{path} is missing; the checkpoint is incomplete; {_previous_good_advice(folder)}")
        if file_record(path) != recorded[name]:
            raise CmdfedError(
                f"{path} is damaged: it does not match its checksum recorded when the checkpoint was written; "
                f"{_previous_good_advice(folder)}"
            )


def _intact(folder: Path) -> bool:
    try:
        recorded = _recorded(folder)
        config = json.loads((folder / "config.json").read_text())
    except (CmdfedError, OSError, ValueError):
        return False
    if recorded is None or not isinstance(config, dict):
        return False  # nothing to vouch for it
    return all((folder / n).is_file() and file_record(folder / n) == r for n, r in recorded.items())


def _previous_good_advice(folder: Path) -> str:
    """Names the newest earlier checkpoint of the run that verifies, and how to resume from it."""
    run = folder.parent
    earlier = sorted((p for p in run.glob("step-*") if p.is_dir() and p.name < folder.name), reverse=True)
    good = next((p for p in earlier if _intact(p)), None)
    if good is None:
        return (
            f"no earlier checkpoint in {run} verifies: restore the run from a backup or start it again in a new folder"
        )
    return (
        f"the previous good checkpoint is {good}: to resume from it, delete {folder} and write "
        f"'{good.name}' into {run / 'latest'} (or use {good} directly)"
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, from a run folder (its ``latest``) or from the name of
    a released model (``cmdfed models list``) when no such path exists."""
    path = Path(path)
    if not path.exists():
        from cmdfed.models import released_model, released_model_dir

        released = released_model_dir(str(path))
        if released is not None:
            path = released
        elif len(path.parts) == 1:  # a bare name: say which released models there are
            try:
                released_model(str(path))
            except CmdfedError as exc:
                raise CmdfedError(f"checkpoint {path} does not exist, and {exc}") from None
    if (path / "config.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / "config.json").is_file():
            return target
        raise CmdfedError(f"{latest} points at {target.name}, which is missing or incomplete")
    if not path.exists():
        raise CmdfedError(f"checkpoint {path} does not exist")
    raise CmdfedError(f"{path} is neither a checkpoint (no config.json) nor a run folder (no 'latest')")


def load_checkpoint(path: str | Path, *, with_trainer: bool = False, backbone_only: bool = False) -> Checkpoint:
    """Read a checkpoint; damaged or foreign files give one error naming the file.

    ``backbone_only``: the caller uses only the backbone and modulation weights (a
    fine-tuning init), so any format in ``BACKBONE_FORMATS`` is accepted.
    """
    folder = resolve_checkpoint(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CmdfedError(f"{folder / 'config.json'} is unreadable ({exc}); the checkpoint is damaged") from exc
    if not isinstance(config, dict) or "format" not in config:
        raise CmdfedError(f"{folder} is not a cmdfed checkpoint (no format in config.json)")
    accepted = BACKBONE_FORMATS if backbone_only else (CHECKPOINT_FORMAT,)
    if config["format"] not in accepted:
        raise CheckpointFormatError(
            f"{folder} is a cmdfed checkpoint of format {config['format']}, this cmdfed reads format "
            f"{CHECKPOINT_FORMAT} (the task heads changed in format 2); train or fine-tune it again with this version, "
            "or use the cmdfed that wrote it"
        )
    ema_present = (folder / "ema.safetensors").exists()
    verify_files(
        folder,
        ["model.safetensors", *(["ema.safetensors"] if ema_present else []), *(["trainer.pt"] if with_trainer else [])],
    )
    weights = _load_tensors(folder / "model.safetensors")
    ema = _load_tensors(folder / "ema.safetensors") if (folder / "ema.safetensors").exists() else None
    trainer = None
    if with_trainer:
        trainer_path = folder / "trainer.pt"
        if not trainer_path.is_file():
            raise CmdfedError(f"{folder} has no trainer.pt, so training cannot resume from it exactly")
        try:
            trainer = torch.load(trainer_path, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise CmdfedError(f"{trainer_path} is damaged ({type(exc).__name__}: {exc})") from exc
    return Checkpoint(folder, config, weights, ema, trainer)


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``given`` does not load into a model whose state dict is ``expected`` (how many entries
    are missing, unexpected or of the wrong shape, with examples), or None when it does."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    if not (missing or unexpected or wrong_shape):
        return None
    return (
        f"{len(missing)} missing (e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
        f"(e.g. {', '.join(unexpected[:3]) or '-'}), {len(wrong_shape)} of the wrong shape "
        f"(e.g. {', '.join(wrong_shape[:3]) or '-'})"
    )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CmdfedError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CmdfedError(f"{path} is damaged or not a safetensors file ({exc})") from exc
