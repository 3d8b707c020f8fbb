"""Private keys on disk: readable by their owner only, written atomically.

Used for the federation's TLS keys (``server/certs.py``) and for a site's SuperNode
authentication key pair (``cmdfed client keygen``): ECDSA P-384, the private key in
OpenSSH format and the public key as one OpenSSH line, which is what Flower's
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cmdfed.atomic import atomic_path, write_bytes_atomic
from cmdfed.errors import CmdfedError


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, private_format: serialization.PrivateFormat) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, private_format, serialization.NoEncryption())
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)  # before writing: a private key is the owner's alone, even for a moment
        tmp.write_bytes(data)


def write_site_keys(out: Path, *, force: bool = False) -> Path:
    """A site's key pair: the private key at ``out``, the public key at ``out.pub`` (returned)."""
    public = out.with_name(out.name + ".pub")
    if (out.exists() or public.exists()) and not force:
        raise CmdfedError(
            f"{out} or {public} exists; pass --force to replace the key (the server must then register the new one)"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    write_private_key(out, key, serialization.PrivateFormat.OpenSSH)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_bytes_atomic(public, line + b"\n")
    return public
