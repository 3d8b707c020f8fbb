"""A site's own settings (Flower's node config) and its cache of frozen weights.

A SuperNode is started with ``--node-config 'store="/data/site.zarr" name="site-a" ...'``;
Flower hands that mapping to every ClientApp call. The store path never leaves the site:
only the name, checked here to be a plain label, appears in what the site sends.

The keys: ``store``, ``name``, ``work-dir`` (the site's files: frozen-weight cache and,
under local DP, its privacy ledger; required then, because the temporary folder it
defaults to is emptied by a reboot, which would silently reset the spent budget),
``device``, ``batch-size`` and ``share-metrics`` (under local DP a site sends only its
privacy numbers, example counts and training time, and skips evaluation, unless this is
true: its losses and evaluation scores are computed from its private data without noise,
so the accountant does not cover them).

Fine-tuning freezes the backbone, so the server sends it once per phase with a fingerprint
(see ``coordinator.RunCoordinator.frozen_fingerprint``) and the site keeps it in its work
folder; later rounds carry only the fingerprint and the heads.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cmdfed.atomic import atomic_path
from cmdfed.data.store import SiteStore
from cmdfed.errors import CmdfedError

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class SiteSettings:
    store: Path
    name: str
    work_dir: Path
    device: str = "auto"
    batch_size: int | None = None  # None = the run's batch size
    share_metrics: bool = (
        False  # under local DP: also send losses and evaluation scores (not covered by the accountant)
    )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], *, dp_mode: str = "off") -> SiteSettings:
        """The site's settings; ``dp_mode`` is the run's (local DP needs a lasting ``work-dir``)."""
        store = str(node_config.get("store", "")).strip()
        if not store:
            raise CmdfedError("the node config names no store; start the site with `cmdfed client start --store ...`")
        name = check_site_name(str(node_config.get("name", "")))
        batch_size = node_config.get("batch-size", 0)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise CmdfedError(f"node config batch-size must be a positive integer (0 = the run's), got {batch_size!r}")
        share_metrics = node_config.get("share-metrics", False)
        if not isinstance(share_metrics, bool):
            raise CmdfedError(f"node config share-metrics must be true or false, got {share_metrics!r}")
        work_dir = str(node_config.get("work-dir", "")).strip()
        if not work_dir and dp_mode == "local":
            raise CmdfedError(
                "this run uses local differential privacy, which keeps the site's privacy ledger in its work folder, "
                "but the node config has no work-dir (the temporary folder used without one is emptied by a reboot, "
                "which would reset the spent budget); start the site with `cmdfed client start --store ... --name ... "
                "--work-dir DIR` (it sets node config work-dir, by default to cmdfed-site-NAME in the folder it is "
                'started from), or add work-dir="DIR" to flower-supernode\'s --node-config'
            )
        work_dir = work_dir or str(Path(tempfile.gettempdir()) / f"cmdfed-site-{name}")
        return cls(
            Path(store), name, Path(work_dir), str(node_config.get("device", "auto")), batch_size or None, share_metrics
        )

    def node_config(self) -> dict[str, Any]:
        """Flower's node config of this site (what ``from_node_config`` reads)."""
        return {
            "store": str(self.store),
            "name": self.name,
            "work-dir": str(self.work_dir),
            "device": self.device,
            "batch-size": self.batch_size or 0,
            "share-metrics": self.share_metrics,
        }

    def to_node_config(self) -> str:
        """The ``--node-config`` argument of ``flower-supernode`` (TOML values)."""
        return " ".join(f"{k}={_toml_value(v)}" for k, v in self.node_config().items())


def check_site_name(name: str) -> str:
    if not SITE_NAME.fullmatch(name):
        raise CmdfedError(
            f"site name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit (it is sent to the server, so it must not be a path)"
        )
    return name


def check_site_store(path: str | Path) -> SiteStore:
    """The site's store, refused when missing, unreadable or without tiles."""
    store = SiteStore.open(path)
    if len(store) == 0:
        raise CmdfedError(f"store {path} has no tiles; add some (`cmdfed data import ...`) before joining a federation")
    return store


def weights_fingerprint(weights: Mapping[str, np.ndarray | torch.Tensor]) -> str:
    """sha256 over names and float32 bytes, identical for numpy arrays and CPU tensors."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(np.asarray(weights[key], dtype=np.float32)).tobytes())
    return digest.hexdigest()


def keep_frozen(site: SiteSettings, fingerprint: str, weights: dict[str, torch.Tensor]) -> None:
    """Store the phase's frozen weights after checking they are what the server announced."""
    if weights_fingerprint(weights) != fingerprint:
        raise CmdfedError("the frozen weights received do not match their fingerprint; the message was damaged")
    site.work_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(_frozen_path(site, fingerprint)) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    for old in site.work_dir.glob("frozen-*.safetensors"):
        if old != _frozen_path(site, fingerprint):
            old.unlink(missing_ok=True)


def load_frozen(site: SiteSettings, fingerprint: str) -> dict[str, torch.Tensor]:
    path = _frozen_path(site, fingerprint)
    if not path.is_file():
        raise CmdfedError(
            f"this site does not hold the frozen weights {fingerprint[:12]}; the server resends them next round"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        path.unlink(missing_ok=True)
        raise CmdfedError(
            f"the cached frozen weights were damaged ({exc}); the server resends them next round"
        ) from exc


def _frozen_path(site: SiteSettings, fingerprint: str) -> Path:
    return site.work_dir / f"frozen-{fingerprint[:16]}.safetensors"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # TOML's booleans (Python's str gives True)
    if not isinstance(value, str):
        return str(value)
    # A TOML literal string: backslashes stay as they are; Flower's parser cannot escape quotes.
    if "'" in value or "\n" in value:
        raise CmdfedError(f"{value!r} cannot be passed to Flower's node config: rename it without quotes or newlines")
    return f"'{value}'"
