"""SHA-256 of files, read in 1 MiB chunks: what checkpoints, bundles, sample downloads and a
federation's initial weights record and check."""

from __future__ import annotations

import hashlib
import os
from typing import IO

CHUNK = 1 << 20


def sha256_of_stream(stream: IO[bytes]) -> tuple[str, int]:
    """(hex digest, bytes read) of what is left in ``stream``."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_of_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_of_stream(f)[0]


def file_record(path: str | os.PathLike) -> dict:
    """{"sha256", "bytes"} of a file, as checkpoints and bundles list their files."""
    with open(path, "rb") as f:
        digest, size = sha256_of_stream(f)
    return {"sha256": digest, "bytes": size}
