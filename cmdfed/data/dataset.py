"""A torch ``Dataset`` over a site store, safe for multi-worker ``DataLoader``.

The zarr group is opened lazily in each worker process (a handle opened in the parent is
not shared across ``fork``), and each sample's augmentation draws from torch's per-worker
RNG, so runs are reproducible under ``torch.manual_seed`` and workers never repeat each
other's random choices.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cmdfed.data.augment import random_dihedral, stain_jitter
from cmdfed.data.store import SiteStore


class SiteDataset(Dataset):
    """Tiles of one store as tensors.

    Each item is a dict: ``image`` float32 (3,H,W) in [0, 1]; ``instances`` int64 (H,W);
    ``types`` int64 (H,W) (zeros when the store has none); ``labelled`` bool; ``index`` int.
    """

    def __init__(
        self,
        path: str | Path,
        indices: Sequence[int] | None = None,
        *,
        augment: bool = False,
        stain_sigma: float = 0.05,
    ):
        self.path = Path(path)
        store = SiteStore.open(self.path)  # validates now, in the parent, with a clear error
        self.indices = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.augment = augment
        self.stain_sigma = stain_sigma
        self.tile_size = store.tile_size
        self.class_names = store.class_names
        self._store: SiteStore | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def store(self) -> SiteStore:
        if self._store is None or self._pid != os.getpid():
            self._store = SiteStore.open(self.path)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        index = int(self.indices[item])
        tile = self.store.tile(index)
        image, instances, types = tile.image, tile.instances, tile.types
        shape = image.shape[:2]
        if instances is None:
            instances = np.zeros(shape, np.int32)
        if types is None:
            types = np.zeros(shape, np.uint8)
        if self.augment:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
            image, instances, types = random_dihedral(rng, image, instances, types)
            image = stain_jitter(image, rng, self.stain_sigma)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
            "instances": torch.from_numpy(instances.astype(np.int64)),
            "types": torch.from_numpy(types.astype(np.int64)),
            "labelled": torch.tensor(tile.labelled),
            "index": torch.tensor(index),
        }
