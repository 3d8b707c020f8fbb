"""Bundles: a folder (and a .tar of it) that carries a model to a workstation.

    manifest.json   what the model is, how to feed it, how to check it (see export.py)
    manifest.sig    optional ed25519 signature of manifest.json's bytes (signing.py)
    model.onnx      single-file ONNX graph (no external data)
    model.pt2       torch.export program, for torch-tensorrt
    golden.npz      a reference input and PyTorch's outputs for it

``manifest.json`` lists the sha256 and size of every other file. Verification, before
anything is installed: the signature first (with a trusted key; it protects the list of
checksums), then the exact set of files (nothing missing, nothing extra) and each
checksum. A .tar is verified by streaming its members without extracting: only regular
files directly under one top folder are accepted, so a crafted archive cannot write
outside it (links, devices, absolute or ``..`` paths are refused).
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path
from typing import IO, Self

from cmdfed.checksums import CHUNK, file_record, sha256_of_stream
from cmdfed.errors import CmdfedError
from edge import signing

# The workstation's tile: with the 64 px overlap, 512 px tiles compute 1.31x the slide's pixels where
# 256 px ones compute 1.78x. Measured here: a job 1.1-1.2x faster on the sample slide and 1.4x on its
# 4x mosaic, at no more peak memory (2 tiles a pass instead of 8), and the development model's PQ on
# CPM-15 08-10 0.577 against 0.571 (benchmarks/README.md, edge_slide).
DEFAULT_TILE = 512

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"
GOLDEN_FILE = "golden.npz"
_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")  # what model_version() makes: a plain folder name


def file_records(folder: Path) -> dict[str, dict]:
    """{name: {sha256, bytes}} of every file in ``folder`` except the manifest and signature."""
    records = {}
    for path in sorted(folder.iterdir()):
        if path.name not in (MANIFEST, SIGNATURE):
            records[path.name] = file_record(path)
    return records


class BundleSource:
    """Read access to a bundle's files, from a folder or a tar, without extracting."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self._tar = None
            self._members = {p.name: p for p in self.path.iterdir()}
            odd = [p.name for p in self._members.values() if p.is_symlink() or not p.is_file()]
        elif self.path.is_file():
            self._tar, self._members, odd = _open_tar(self.path)
        else:
            raise CmdfedError(f"bundle {self.path} does not exist; give the bundle folder or its .tar")
        if odd:
            raise CmdfedError(f"{self.path}: unexpected entries {sorted(odd)} (only plain files belong in a bundle)")

    @property
    def names(self) -> set[str]:
        return set(self._members)

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def open(self, name: str) -> IO[bytes]:
        if name not in self._members:
            raise CmdfedError(f"{self.path} has no {name}; it is not a complete cmdfed edge bundle")
        if self._tar is None:
            return open(self._members[name], "rb")
        return self._tar.extractfile(self._members[name])

    def copy_to(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=False)
        for name in sorted(self.names):
            with self.open(name) as src, open(folder / name, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_tar(path: Path) -> tuple[tarfile.TarFile, dict, list[str]]:
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 - returned open; BundleSource.close() closes it
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CmdfedError(
            f"{path} is not a readable bundle archive ({exc}); give the bundle folder or its .tar"
        ) from exc
    files, odd = {}, []
    tops = {m.name.split("/", 1)[0] for m in members}
    for member in members:
        parts = member.name.split("/")
        if len(tops) != 1 or member.name.startswith("/") or ".." in parts:
            odd.append(member.name)
        elif member.isdir() and len(parts) == 1:
            continue
        elif member.isfile() and len(parts) == 2:
            files[parts[1]] = member
        else:
            odd.append(member.name)
    return tar, files, odd


def parse_manifest(data: bytes, where: str) -> dict:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CmdfedError(f"{where}: manifest.json is not valid JSON ({exc}); the bundle is damaged") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CmdfedError(f"{where}: manifest.json has no file list; it is not a cmdfed edge bundle")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CmdfedError(
            f"{where}: bundle schema version {manifest.get('schema_version')} is not supported by this cmdfed "
            f"(it reads version {SCHEMA_VERSION}); upgrade cmdfed on this workstation or re-export"
        )
    model = manifest.get("model")
    version = model.get("version") if isinstance(model, dict) else None
    # The version names the install folder: a crafted one must not point outside models/.
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise CmdfedError(
            f"{where}: manifest.json has no valid model version ({version!r}); the bundle is damaged or crafted"
        )
    return manifest


def check_signature(source: BundleSource, trust_keys) -> str:
    """The key id of the trusted key (one key, or ``{key_id: key}``) that signed the bundle's
    manifest; CmdfedError when it is unsigned or not validly signed by one of them."""
    where = str(source.path)
    if SIGNATURE not in source.names:
        raise CmdfedError(
            f"{where} is not signed, but a signature by a trusted key is required; refusing to deploy an unsigned "
            "bundle"
        )
    return signing.verify(source.read_bytes(MANIFEST), source.read_bytes(SIGNATURE), trust_keys, where)


def verify_bundle(source: BundleSource, trust_key=None) -> dict:
    """The manifest of a bundle whose signature (when ``trust_key`` is given: one key or
    ``{key_id: key}``) and checksums hold."""
    where = str(source.path)
    if trust_key is not None and not (isinstance(trust_key, dict) and not trust_key):
        check_signature(source, trust_key)
    manifest_bytes = source.read_bytes(MANIFEST)
    manifest = parse_manifest(manifest_bytes, where)
    listed = set(manifest["files"])
    present = source.names - {MANIFEST, SIGNATURE}
    if listed != present:
        missing, extra = sorted(listed - present), sorted(present - listed)
        raise CmdfedError(
            f"{where}: files differ from the manifest (missing {missing}, unexpected {extra}); refusing it"
        )
    for name in sorted(listed):
        with source.open(name) as f:
            sha, size = sha256_of_stream(f)
        expected = manifest["files"][name]
        if sha != expected.get("sha256") or size != expected.get("bytes"):
            raise CmdfedError(
                f"{where}: {name} does not match its checksum in the manifest (tampered or damaged); refusing it"
            )
    return manifest


def write_tar(folder: Path, tar_path: Path) -> None:
    """``folder`` as an uncompressed tar with one top folder (weights barely compress)."""
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(folder, arcname=folder.name, recursive=False)
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"{folder.name}/{path.name}", filter=_normalise_member)


def _normalise_member(member: tarfile.TarInfo) -> tarfile.TarInfo:
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    member.mode = 0o644
    return member
