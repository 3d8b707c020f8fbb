"""The site store: one zarr 3 group per site holding tiles, labels and per-tile metadata.

Layout (``SCHEMA_VERSION`` 1)::

    site.zarr/
      zarr.json            group attributes: kind, schema_version, n_tiles, tile_size, mpp,
                           class_names, has_types, name
      images     (N,H,W,3) uint8   chunk = one tile, shard = ``shard_tiles`` tiles
      instances  (N,H,W)   int32   0 = background, 1..k = nuclei of that tile
      types      (N,H,W)   uint8   optional; 0 = background, c = class_names[c]
      source, slide_id, tissue     (N,) str    where the tile came from; tissue type if known
      x, y                         (N,) int32  top-left corner in the source image (level 0 px)
      mpp, tissue_fraction         (N,) float32
      labelled                     (N,) bool   instances/types are real labels for this tile

Why this shape:

* One chunk per tile makes random access for a training loader read exactly one tile;
  shards group many chunks into one file so a store of 100k tiles is not 100k files.
  A shard is rewritten whole whenever any tile in it changes, so writers only ever write
  shard-aligned batches (:class:`StoreWriter` buffers tiles until a shard is full).
* ``n_tiles`` in the group attributes is the committed length. A writer grows the arrays
  and writes its batches (each shard file is replaced atomically by zarr's local store), and
  only when it closes is ``n_tiles`` advanced. A write interrupted at any point, even killed,
  leaves a store that reads at its previous length; the next writer trims the uncommitted
  tail. A new store is built beside its final path and renamed into place
  (:func:`create_store`), so a failed import leaves nothing behind.
* A store knows its own completeness: with ``n_tiles``, each commit records in ``chunks``
  which chunk (shard) files of each array exist (ranges of chunk indices along the tile axis;
  zarr writes no file for an all-empty chunk, so "absent" is legitimate and recorded too).
  Opening a store (training, federation, ``data info``) checks that every recorded file of the
  committed tiles still exists: one ``stat`` per file, no data read. A deleted chunk would
  otherwise read as zeros (empty masks, "unlabelled" tiles); it is refused, naming the array,
  the tiles and how to re-import. Damaged bytes inside a file surface as a read error naming
  the store (:meth:`SiteStore._read`). Stores written before the record existed open with one
  warning per process and are not checked; re-importing them (or appending a tile) records it.
* Everything a reader needs to interpret labels (class names, mpp, tile size) lives in
  the group attributes, so a store is self-describing when it is moved between machines.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import zarr
import zarr.errors

from cmdfed.atomic import replace_dir
from cmdfed.errors import CmdfedError
from cmdfed.inference.stain import sample_positions
from cmdfed.progress import Progress, report

STORE_KIND = "cmdfed-site-store"
SCHEMA_VERSION = 1
DEFAULT_SHARD_TILES = 64

TEXT_FIELDS = ("source", "slide_id", "tissue")
META_FIELDS: dict[str, str] = {
    "source": "str",
    "slide_id": "str",
    "tissue": "str",
    "x": "int32",
    "y": "int32",
    "mpp": "float32",
    "tissue_fraction": "float32",
    "labelled": "bool",
}
META_CHUNK = 4096
REIMPORT = (
    "re-import the store from its source with the command that made it (`cmdfed data import ... --overwrite`, "
    "`cmdfed data tile-slide` or `cmdfed data synth`), or restore it from a backup"
)

log = logging.getLogger("cmdfed.data")
_warned_unrecorded: set[str] = set()


@dataclass
class Tile:
    """One tile and what is known about it, as importers hand it to a :class:`StoreWriter`."""

    image: np.ndarray
    instances: np.ndarray | None = None
    types: np.ndarray | None = None
    source: str = ""
    slide_id: str = ""
    tissue: str = ""
    x: int = 0
    y: int = 0
    mpp: float = float("nan")
    tissue_fraction: float = 1.0

    @property
    def labelled(self) -> bool:
        return self.instances is not None


@dataclass
class StoreInfo:
    path: str
    name: str
    schema_version: int
    tiles: int
    labelled: int
    tile_size: int
    mpp: float
    class_names: list[str]
    has_types: bool
    sources: dict[str, int] = field(default_factory=dict)
    nuclei: int = 0
    size_bytes: int = 0

    @property
    def labelled_fraction(self) -> float:
        return self.labelled / self.tiles if self.tiles else 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mpp"] = None if math.isnan(self.mpp) else self.mpp
        d["labelled_fraction"] = self.labelled_fraction
        return d


def _not_a_store(path: Path, why: str) -> CmdfedError:
    return CmdfedError(
        f"{path} is not a cmdfed site store ({why}); create one with `cmdfed data import ...`, "
        "`cmdfed data tile-slide` or `cmdfed data synth`"
    )


class SiteStore:
    """A site's tiles on disk. Open read-only for training; write through :meth:`writer`."""

    def __init__(self, path: Path, group: zarr.Group, mode: str):
        self.path = path
        self._group = group
        self.mode = mode
        self.attrs = dict(group.attrs)
        self._length = int(self.attrs["n_tiles"])
        self._metadata: dict[str, np.ndarray] = {}

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        tile_size: int,
        class_names: Sequence[str] = ("background", "nucleus"),
        has_types: bool = False,
        mpp: float = float("nan"),
        name: str | None = None,
        shard_tiles: int | None = DEFAULT_SHARD_TILES,
        overwrite: bool = False,
    ) -> SiteStore:
        """Create an empty store. ``class_names[0]`` is always the background.

        ``shard_tiles=None`` stores one file per tile chunk (no sharding); kept for comparison
        in the benchmarks and for file systems where many small files are cheap.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise CmdfedError(f"{path} already exists; choose another path or pass --overwrite")
        if tile_size <= 0 or tile_size % 32:
            raise CmdfedError(f"tile size must be a positive multiple of 32 (got {tile_size})")
        if len(class_names) < 2 or class_names[0] != "background":
            raise CmdfedError("class_names must start with 'background' and name at least one class")
        group = zarr.open_group(str(path), mode="w")
        t = tile_size

        def tiles_array(key: str, tail: tuple[int, ...], dtype: str) -> None:
            shards = None if shard_tiles is None else (shard_tiles, *tail)
            group.create_array(key, shape=(0, *tail), chunks=(1, *tail), shards=shards, dtype=dtype)

        tiles_array("images", (t, t, 3), "uint8")
        tiles_array("instances", (t, t), "int32")
        if has_types:
            tiles_array("types", (t, t), "uint8")
        for key, dtype in META_FIELDS.items():
            group.create_array(key, shape=(0,), chunks=(META_CHUNK,), dtype=str if dtype == "str" else dtype)
        group.attrs.update(
            {
                "kind": STORE_KIND,
                "schema_version": SCHEMA_VERSION,
                "name": name or path.stem,
                "n_tiles": 0,
                "tile_size": tile_size,
                "mpp": None if math.isnan(mpp) else float(mpp),
                "class_names": list(class_names),
                "has_types": bool(has_types),
                "shard_tiles": shard_tiles,
                "chunks": {},
            }
        )
        return cls(path, group, "r+")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", *, check: bool = True) -> SiteStore:
        """Open an existing store; ``mode`` is ``"r"`` (default) or ``"r+"`` to append.

        ``check``: refuse a store whose recorded chunk files are not all there (see the module
        docstring); only replacing a store skips it."""
        path = Path(path)
        if not path.exists():
            raise CmdfedError(f"site store {path} does not exist")
        if not (path / "zarr.json").is_file():
            raise _not_a_store(path, "no zarr.json: not a zarr 3 group")
        try:
            group = zarr.open_group(str(path), mode=mode)
        except (zarr.errors.BaseZarrError, ValueError, KeyError, OSError) as exc:
            raise _not_a_store(path, f"unreadable group metadata: {exc}") from exc
        attrs = dict(group.attrs)
        if attrs.get("kind") != STORE_KIND:
            raise _not_a_store(path, "a zarr group without cmdfed attributes")
        version = attrs.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise CmdfedError(
                f"{path} has store schema version {version}, newer than this cmdfed understands "
                f"({SCHEMA_VERSION}); upgrade cmdfed to read it"
            )
        missing = [k for k in ("images", "instances", *META_FIELDS) if k not in group]
        if missing:
            raise _not_a_store(path, f"missing arrays: {', '.join(missing)}")
        store = cls(path, group, mode)
        if check:
            store.check_complete()
        return store

    # -- facts --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._length

    @property
    def tile_size(self) -> int:
        return int(self.attrs["tile_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def has_types(self) -> bool:
        return bool(self.attrs["has_types"])

    @property
    def mpp(self) -> float:
        mpp = self.attrs.get("mpp")
        return float("nan") if mpp is None else float(mpp)

    @property
    def name(self) -> str:
        return str(self.attrs.get("name", self.path.stem))

    # -- reading ------------------------------------------------------------------------

    def _read(self, key: str, selection) -> np.ndarray:
        try:
            return self._group[key][selection]
        except CmdfedError:
            raise
        except Exception as exc:  # codec and I/O errors from a damaged chunk or shard
            raise CmdfedError(
                f"{self.path}: cannot read '{key}' at {selection!r}: {type(exc).__name__}: {exc}. "
                "The store is damaged; re-import it from its source"
            ) from exc

    def _check_index(self, index: int) -> int:
        if not -self._length <= index < self._length:
            raise IndexError(f"tile {index} out of range for {self.path} with {self._length} tiles")
        return index % self._length

    def image(self, index: int) -> np.ndarray:
        return self._read("images", self._check_index(index))

    def instances(self, index: int) -> np.ndarray:
        return self._read("instances", self._check_index(index))

    def types(self, index: int) -> np.ndarray | None:
        return self._read("types", self._check_index(index)) if self.has_types else None

    def metadata(self, key: str) -> np.ndarray:
        """The committed part of a per-tile metadata array (read once, then kept in memory)."""
        if key not in META_FIELDS:
            raise KeyError(f"unknown metadata field {key!r}; known: {', '.join(META_FIELDS)}")
        if key not in self._metadata:
            self._metadata[key] = self._read(key, slice(0, self._length))
        return self._metadata[key]

    def tile(self, index: int) -> Tile:
        i = self._check_index(index)
        meta = {k: self.metadata(k)[i] for k in META_FIELDS}
        labelled = bool(meta.pop("labelled"))
        return Tile(
            image=self.image(i),
            instances=self.instances(i) if labelled else None,
            types=self.types(i) if labelled else None,
            source=str(meta["source"]),
            slide_id=str(meta["slide_id"]),
            tissue=str(meta["tissue"]),
            x=int(meta["x"]),
            y=int(meta["y"]),
            mpp=float(meta["mpp"]),
            tissue_fraction=float(meta["tissue_fraction"]),
        )

    def labelled_indices(self) -> np.ndarray:
        return np.flatnonzero(self.metadata("labelled"))

    def stain_sample(self, indices: np.ndarray) -> list[np.ndarray]:
        """The tiles among ``indices`` to estimate their stains on (``cmdfed.inference.stain.sample_positions``)."""
        indices = np.asarray(indices)
        return [self.image(int(indices[k])) for k in sample_positions(indices.size, self.tile_size)]

    def labelled_subset(self, fraction: float, seed: int = 0) -> np.ndarray:
        """Indices of a reproducible ``fraction`` of the labelled tiles (at least one).

        One permutation per seed, cut at different lengths, so the subsets are nested:
        the 1% subset is inside the 5% one, which is inside the 10% one.
        """
        if not 0 < fraction <= 1:
            raise CmdfedError(f"label fraction must be in (0, 1], got {fraction}")
        labelled = self.labelled_indices()
        if labelled.size == 0:
            raise CmdfedError(f"{self.path} has no labelled tiles")
        order = np.random.default_rng(seed).permutation(labelled)
        keep = max(1, math.ceil(fraction * labelled.size))
        return np.sort(order[:keep])

    def info(self) -> StoreInfo:
        labelled = self.metadata("labelled")
        sources, counts = np.unique(self.metadata("source"), return_counts=True)
        nuclei = sum(int(np.count_nonzero(np.unique(self.instances(int(i))))) for i in np.flatnonzero(labelled))
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return StoreInfo(
            path=str(self.path),
            name=self.name,
            schema_version=int(self.attrs["schema_version"]),
            tiles=len(self),
            labelled=int(labelled.sum()),
            tile_size=self.tile_size,
            mpp=self.mpp,
            class_names=self.class_names,
            has_types=self.has_types,
            sources={str(s): int(c) for s, c in zip(sources, counts)},
            nuclei=nuclei,
            size_bytes=size,
        )

    # -- completeness -------------------------------------------------------------------

    def _tiles_per_file(self, key: str) -> int:
        arr = self._group[key]
        return int(arr.shards[0] if arr.shards else arr.chunks[0])

    def _chunk_file(self, key: str, index: int) -> Path:
        arr = self._group[key]
        return self.path / key / arr.metadata.encode_chunk_key((index, *[0] * (arr.ndim - 1)))

    def _present_chunks(self, length: int) -> dict[str, list[list[int]]]:
        """{array: [[first, stop), ...]} of the chunk files that exist for the first ``length`` tiles."""
        record = {}
        for key in self._array_keys():
            n_files = -(-length // self._tiles_per_file(key))
            present = [i for i in range(n_files) if self._chunk_file(key, i).is_file()]
            record[key] = _ranges(present)
        return record

    def check_complete(self) -> None:
        """Refuse the store if a chunk file recorded at its last commit is gone (stats only)."""
        recorded = self.attrs.get("chunks")
        if recorded is None:
            if str(self.path) not in _warned_unrecorded:
                _warned_unrecorded.add(str(self.path))
                log.warning(
                    "%s was written by an older cmdfed and records no chunk list, so a deleted chunk file would read "
                    "as empty tiles; re-import it (or append a tile to it) to have it checked",
                    self.path,
                )
            return
        gone = []
        for key, ranges in recorded.items():
            if key not in self._group:
                gone.append(f"'{key}' (the whole array)")
                continue
            per = self._tiles_per_file(key)
            n_files = -(-self._length // per)
            lost = [
                i
                for start, stop in ranges
                for i in range(start, min(stop, n_files))
                if not self._chunk_file(key, i).is_file()
            ]
            if lost:
                tiles = ", ".join(f"tiles {a * per}-{min(b * per, self._length) - 1}" for a, b in _ranges(lost)[:5]) + (
                    " ..." if len(_ranges(lost)) > 5 else ""
                )
                gone.append(f"'{key}' {len(lost)} file(s), {tiles}")
        if gone:
            raise CmdfedError(
                f"{self.path} is incomplete (damaged): chunk files written to it are missing ({'; '.join(gone)}), and "
                f"those tiles would read as empty images or labels; {REIMPORT}"
            )

    # -- writing ------------------------------------------------------------------------

    def writer(self) -> StoreWriter:
        if self.mode == "r":
            raise CmdfedError(f"{self.path} is open read-only; open it with mode='r+' to append")
        return StoreWriter(self)

    def _commit(self, new_length: int) -> None:
        chunks = self._present_chunks(new_length)
        self._group.attrs.update({"n_tiles": new_length, "chunks": chunks})  # one write of zarr.json
        self.attrs.update({"n_tiles": new_length, "chunks": chunks})
        self._length = new_length
        self._metadata = {}

    def _array_keys(self) -> list[str]:
        return ["images", "instances", *(["types"] if self.has_types else []), *META_FIELDS]

    def _trim_uncommitted(self) -> None:
        for key in self._array_keys():
            arr = self._group[key]
            if arr.shape[0] != self._length:
                arr.resize((self._length, *arr.shape[1:]))


class StoreWriter:
    """Appends tiles in shard-aligned batches; commits them all when closed.

    Tiles are buffered until the next shard boundary, so every shard is written once per
    batch rather than once per tile. Nothing is visible to readers until :meth:`close`; a
    writer left by an exception (or a killed process) leaves the committed length as it was.
    """

    def __init__(self, store: SiteStore):
        self.store = store
        # Unsharded stores are still written in batches of the default shard size.
        self.shard_tiles = int(store.attrs.get("shard_tiles") or DEFAULT_SHARD_TILES)
        self._buffer: list[Tile] = []
        store._trim_uncommitted()
        self._written = len(store)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._buffer = []
            self.store._trim_uncommitted()

    @property
    def pending(self) -> int:
        """Tiles added but not yet committed."""
        return self._written + len(self._buffer) - len(self.store)

    def add(self, tile: Tile) -> None:
        self._validate(tile)
        self._buffer.append(tile)
        if (self._written + len(self._buffer)) % self.shard_tiles == 0:
            self._flush()

    def extend(self, tiles: Iterable[Tile]) -> None:
        for tile in tiles:
            self.add(tile)

    def close(self) -> None:
        self._flush()
        if self._written != len(self.store) or "chunks" not in self.store.attrs:
            self.store._commit(self._written)

    def _validate(self, tile: Tile) -> None:
        t = self.store.tile_size
        img = tile.image
        if img.dtype != np.uint8 or img.shape != (t, t, 3):
            raise CmdfedError(f"tile image must be uint8 of shape ({t}, {t}, 3), got {img.dtype} {img.shape}")
        if tile.instances is not None and tile.instances.shape != (t, t):
            raise CmdfedError(f"instance map must have shape ({t}, {t}), got {tile.instances.shape}")
        if tile.types is not None:
            if not self.store.has_types:
                raise CmdfedError(f"{self.store.path} was created without types; tile has a type map")
            if tile.types.shape != (t, t):
                raise CmdfedError(f"type map must have shape ({t}, {t}), got {tile.types.shape}")
            if int(tile.types.max(initial=0)) >= len(self.store.class_names):
                raise CmdfedError(
                    f"type map has class {int(tile.types.max())} but the store has only "
                    f"{len(self.store.class_names)} classes ({', '.join(self.store.class_names)})"
                )

    def _flush(self) -> None:
        if not self._buffer:
            return
        store, tiles = self.store, self._buffer
        start = self._written
        stop = start + len(tiles)
        t = store.tile_size
        group = store._group
        columns: dict[str, np.ndarray] = {
            "images": np.stack([tile.image for tile in tiles]),
            "instances": np.stack(
                [
                    tile.instances.astype(np.int32, copy=False)
                    if tile.instances is not None
                    else np.zeros((t, t), np.int32)
                    for tile in tiles
                ]
            ),
        }
        if store.has_types:
            columns["types"] = np.stack(
                [tile.types if tile.types is not None else np.zeros((t, t), np.uint8) for tile in tiles]
            ).astype(np.uint8)
        for key, dtype in META_FIELDS.items():
            values = [getattr(tile, key) for tile in tiles]
            columns[key] = np.array(values, dtype=object if key in TEXT_FIELDS else dtype)
        for key, values in columns.items():
            arr = group[key]
            arr.resize((stop, *arr.shape[1:]))
            arr[start:stop] = values
        self._written = stop
        self._buffer = []


def _ranges(indices: list[int]) -> list[list[int]]:
    """Sorted indices as [[first, stop), ...] runs."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse a target that exists, unless ``overwrite`` and it is a cmdfed site store.

    Only a site store is ever replaced, never another file or folder: a mistyped target
    path (the source folder itself, a home directory) must not delete anyone's data.
    """
    if not path.exists():
        return
    if not overwrite:
        raise CmdfedError(f"{path} already exists; choose another path or pass --overwrite")
    try:
        SiteStore.open(path, check=False)  # checks the cmdfed store attributes (a damaged store may be replaced)
    except CmdfedError:
        raise CmdfedError(
            f"{path} exists and is not a cmdfed site store; refusing to replace it, choose another path"
        ) from None


@contextlib.contextmanager
def create_store(path: str | Path, *, overwrite: bool = False, **options) -> Iterator[SiteStore]:
    """Build a new store beside ``path`` and move it into place only if the block succeeds.

    ``options`` are those of :meth:`SiteStore.create`. On any exception the partial store is
    removed and an existing store at ``path`` is left untouched; with ``overwrite`` an
    existing *site store* (nothing else, see :func:`check_target`) is moved aside, the new
    one renamed in, and only then the old one deleted.
    """
    path = Path(path)
    check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        store = SiteStore.create(tmp, name=options.pop("name", None) or path.stem, **options)
        yield store
        replace_dir(tmp, path)
        # Re-point the handle at the final path so the caller can keep reading it.
        store.__init__(path, zarr.open_group(str(path), mode="r"), "r")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_subset(
    source: str | Path,
    target: str | Path,
    *,
    fraction: float,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StoreInfo:
    """Copy a reproducible ``fraction`` of the labelled tiles into a new store."""
    src = SiteStore.open(source)
    indices = src.labelled_subset(fraction, seed)
    options = {
        "tile_size": src.tile_size,
        "class_names": src.class_names,
        "has_types": src.has_types,
        "mpp": src.mpp,
        "shard_tiles": src.attrs.get("shard_tiles"),
    }
    with create_store(target, overwrite=overwrite, **options) as store:
        with store.writer() as writer:
            for done, index in enumerate(indices, start=1):
                writer.add(src.tile(int(index)))
                report(progress, done, len(indices), "tiles")
        store._group.attrs["subset_of"] = {"store": src.name, "fraction": fraction, "seed": seed}
    return store.info()
