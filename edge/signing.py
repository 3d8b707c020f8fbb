"""ed25519 keys and manifest signatures.

The signature covers the exact bytes of ``manifest.json``; the manifest holds the sha256
of every other file, so one signature vouches for the whole bundle. ed25519 because keys
and signatures are small, there are no parameters to get wrong, and verification is
deterministic (``cryptography``'s implementation).

Key files are PEM: the private key PKCS#8, unencrypted but written 0600 (it lives on the
export machine; keep it in a secret store), the public key SubjectPublicKeyInfo (copied to
every workstation as ``--trust-key``). ``key_id`` (first 16 hex digits of the sha256 of the
raw public key) is stored next to the signature so that a refusal can say which key
signed and which one was trusted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cmdfed.atomic import atomic_path, write_bytes_atomic
from cmdfed.errors import CmdfedError

ALGORITHM = "ed25519"


def generate_key_pair(prefix: str | Path) -> tuple[Path, Path]:
    """Write PREFIX.key (private, 0600) and PREFIX.pub; refuses to overwrite either."""
    private_path, public_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing:
        raise CmdfedError(f"{', '.join(existing)} already exist(s); choose another prefix or delete them first")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with atomic_path(private_path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_bytes(private_pem)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_bytes_atomic(public_path, public_pem)
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = _load_pem(path, serialization.load_pem_private_key, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise CmdfedError(f"{path} is not an ed25519 private key; make one with `cmdfed edge keygen`")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    key = _load_pem(path, serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise CmdfedError(f"{path} is not an ed25519 public key; use the .pub file `cmdfed edge keygen` wrote")
    return key


def _load_pem(path: str | Path, loader, **kwargs):
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CmdfedError(f"cannot read key file {path}: {exc.strerror}") from exc
    try:
        return loader(data, **kwargs)
    except (ValueError, TypeError) as exc:
        raise CmdfedError(f"{path} is not a PEM key file ({exc})") from exc


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(message: bytes, private_key: Ed25519PrivateKey) -> dict:
    """The signature record stored as ``manifest.sig``."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(message)).decode(),
    }


def verify(message: bytes, record_bytes: bytes, public_key, where: str) -> str:
    """Raise CmdfedError unless ``record_bytes`` (a manifest.sig) signs ``message`` with
    ``public_key`` (or with one of the keys of a ``{key_id: key}`` dict); the signer's key id."""
    keys = public_key if isinstance(public_key, dict) else {key_id(public_key): public_key}
    try:
        record = json.loads(record_bytes)
        signature = base64.b64decode(record["signature"], validate=True)
        algorithm, signer = record["algorithm"], record.get("key_id", "?")
    except (ValueError, KeyError, TypeError) as exc:
        raise CmdfedError(f"{where}: manifest.sig is malformed ({exc}); re-export the bundle") from exc
    if algorithm != ALGORITHM:
        raise CmdfedError(f"{where}: signature algorithm {algorithm!r} is not supported (only {ALGORITHM})")
    if signer not in keys:
        trusted = ", ".join(sorted(keys))
        raise CmdfedError(
            f"{where}: signed by key {signer}, but the trusted key{' is' if len(keys) == 1 else 's are'} {trusted}; "
            "refusing to deploy (get the bundle from its publisher or the right public key)"
        )
    try:
        keys[signer].verify(signature, message)
    except InvalidSignature:
        raise CmdfedError(
            f"{where}: the signature does not match manifest.json, which was changed after signing; refusing to deploy"
        ) from None
    return signer
