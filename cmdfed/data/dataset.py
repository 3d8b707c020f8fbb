"""Torch datasets over site stores, safe for multi-worker ``DataLoader``.

The zarr group is opened lazily in each worker process (a handle opened in the parent is
not shared across ``fork``). Augmentation randomness comes from one of two places:

* an item requested as ``dataset[i]`` draws from torch's per-worker RNG, so runs are
  reproducible under ``torch.manual_seed`` and workers never repeat each other's choices;
* an item requested as ``dataset[(i, seed)]`` (what :class:`StepBatchSampler` yields) is a
  pure function of ``(i, seed)``. Training uses this: the whole stream of augmented
  batches is then fixed by the run's seed, whatever the number of workers, and a run
  resumed at step ``s`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cmdfed.data.augment import random_blur, random_dihedral, random_scale, stain_jitter
from cmdfed.data.store import SiteStore
from cmdfed.errors import CmdfedError
from cmdfed.model.targets import make_targets


class SiteDataset(Dataset):
    """Tiles of one store as tensors.

    Each item is a dict: ``image`` float32 (3,H,W) in [0, 1]; ``instances`` int64 (H,W);
    ``types`` int64 (H,W) (zeros when the store has none); ``labelled`` bool; ``index`` int.
    With ``targets=True`` also HoVer-Net's training targets (see ``cmdfed.model.targets``),
    computed in the worker: ``np`` int64 (H,W), ``hv`` float32 (2,H,W), ``nc`` int64 (H,W).
    """

    def __init__(
        self,
        path: str | Path,
        indices: Sequence[int] | None = None,
        *,
        augment: bool = False,
        stain_sigma: float = 0.05,
        scale_jitter: float = 0.0,
        blur_sigma: float = 0.0,
        targets: bool = False,
    ):
        self.path = Path(path)
        store = SiteStore.open(self.path)  # validates now, in the parent, with a clear error
        self.indices = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.augment = augment
        self.stain_sigma = stain_sigma
        self.scale_jitter = scale_jitter
        self.blur_sigma = blur_sigma
        self.targets = targets
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

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        position, seed = item if isinstance(item, tuple) else (item, None)
        index = int(self.indices[position])
        tile = self.store.tile(index)
        image, instances, types = tile.image, tile.instances, tile.types
        shape = image.shape[:2]
        if instances is None:
            instances = np.zeros(shape, np.int32)
        if types is None:
            types = np.zeros(shape, np.uint8)
        if self.augment:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ())) if seed is None else seed)
            image, instances, types = random_dihedral(rng, image, instances, types)
            image, instances, types = random_scale(rng, self.scale_jitter, image, instances, types)
            image = stain_jitter(image, rng, self.stain_sigma)
            image = random_blur(image, rng, self.blur_sigma)
        item = {
            "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
            "instances": torch.from_numpy(instances.astype(np.int64)),
            "types": torch.from_numpy(types.astype(np.int64)),
            "labelled": torch.tensor(tile.labelled),
            "index": torch.tensor(index),
        }
        if self.targets:
            hover = make_targets(instances, types)
            item["np"] = torch.from_numpy(hover.nuclear_pixels)
            item["hv"] = torch.from_numpy(hover.hv)
            item["nc"] = torch.from_numpy(hover.nuclear_types)
        return item


class MultiStoreDataset(Dataset):
    """Several site datasets as one; items are addressed like :class:`SiteDataset`'s."""

    def __init__(self, datasets: Sequence[SiteDataset]):
        if not datasets:
            raise CmdfedError("no site stores given")
        sizes = {d.tile_size for d in datasets}
        if len(sizes) > 1:
            detail = ", ".join(f"{d.path}: {d.tile_size}" for d in datasets)
            raise CmdfedError(f"stores have different tile sizes ({detail}); train on stores of one tile size")
        self.datasets = list(datasets)
        self.tile_size = sizes.pop()
        self.offsets = np.cumsum([0] + [len(d) for d in datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        position, seed = item if isinstance(item, tuple) else (item, None)
        if not 0 <= position < len(self):
            raise IndexError(f"item {position} out of range for {len(self)} tiles")
        which = int(np.searchsorted(self.offsets, position, side="right") - 1)
        local = int(position - self.offsets[which])
        return self.datasets[which][(local, seed) if seed is not None else local]


class StepBatchSampler(Sampler):
    """Batches of ``(position, augmentation seed)`` for training step ``start_step`` onwards.

    Step ``s`` takes positions ``s*B .. s*B+B-1`` of an endless stream made of one shuffled
    pass over the dataset after another (pass ``e`` shuffled with ``(seed, e)``), so the
    batch at any step is known without replaying the ones before it.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int = 0, steps: int | None = None):
        if size == 0:
            raise CmdfedError("the training set is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.steps = start_step, steps

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        first = step * self.batch_size
        batch, cached = [], {}
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.size)
            if epoch not in cached:
                cached[epoch] = self._permutation(epoch)
            augment_seed = int(np.random.default_rng([self.seed, position, 1]).integers(2**62))
            batch.append((int(cached[epoch][offset]), augment_seed))
        return batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.steps is None or step < self.start_step + self.steps:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless sampler has no length")
        return self.steps
