"""Released models shipped inside the package, as a model zoo ships them: weights and a card.

Each released model is a folder here named after the model::

    cmd-tiny-he/
      card.json        what it is, the data (with origin and terms), the command that made it,
                       its steps, the development-split scores of its recipe and their commit
      latest           -> step-NNNNNN (a cmdfed run folder, so every checkpoint reader takes it)
      step-NNNNNN/     config.json + model.safetensors (weights only: no optimizer state)

Anywhere a checkpoint path is taken (``cmdfed train finetune --init``, ``cmdfed predict
--checkpoint``, ``cmdfed edge export --checkpoint``, the federation's initial weights) a
released model's name works too: ``resolve_checkpoint`` asks :func:`released_model_dir`
when the path does not exist. ``python -m benchmarks.release`` makes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from cmdfed.errors import CmdfedError

CARD_FILE = "card.json"


@dataclass(frozen=True)
class ModelCard:
    name: str
    path: Path
    card: dict

    @property
    def summary(self) -> str:
        return str(self.card.get("summary", ""))

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), **self.card}


def models_dir() -> Path:
    return Path(str(files("cmdfed.models")))


def released_models() -> dict[str, ModelCard]:
    """Every released model in the package, by name."""
    found = {}
    for folder in sorted(p for p in models_dir().iterdir() if (p / CARD_FILE).is_file()):
        try:
            card = json.loads((folder / CARD_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CmdfedError(
                f"the card of released model {folder.name} is unreadable ({exc}); reinstall cmdfed"
            ) from exc
        found[folder.name] = ModelCard(folder.name, folder, card)
    return found


def released_model(name: str) -> ModelCard:
    """The card of released model ``name``; an unknown name lists the ones that exist."""
    models = released_models()
    if name not in models:
        known = ", ".join(models) or "none in this install"
        raise CmdfedError(f"no released model named {name!r}; released models: {known} (cmdfed models list)")
    return models[name]


def released_model_dir(name: str) -> Path | None:
    """The run folder of released model ``name``, None when ``name`` is not one of them."""
    if "/" in name or name in (".", ".."):
        return None
    folder = models_dir() / name
    return folder if (folder / CARD_FILE).is_file() else None
