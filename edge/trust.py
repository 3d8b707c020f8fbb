"""An edge home's trust policy: which publishers' keys it trusts, and the log of what it let in.

    HOME/trust.json   {"keys": {key_id: {"public_key": PEM, "added_at", "how"}}}
    HOME/audit.log    one JSON line per trust change and per bundle let in without a checked
                      signature (``--allow-unsigned``)

A home with no trusted key (never given one) deploys unsigned bundles, and ``edge status``
says that no signature was checked. Once a key is trusted (the first ``edge deploy
--trust-key KEY``, or ``edge trust add KEY``), the home keeps it: every later deploy and
rollback must carry a signature by one of its keys, whether or not ``--trust-key`` is given;
an unsigned bundle or a bad signature is refused unless the operator passes
``--allow-unsigned``, which is written to ``audit.log`` and logged. A ``--trust-key`` the home
does not already trust is refused (add it first with ``edge trust add``, which is logged), so
a key brought along with a bundle cannot replace the publisher's. The last trusted key cannot
be removed, only replaced (add the new one, then remove the old one).

Keys are read from the home, so its files are what is trusted: protect HOME like the
software itself (only the operator may write it).
"""

from __future__ import annotations

import datetime
import getpass
import json
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cmdfed.atomic import write_json_atomic
from cmdfed.errors import CmdfedError
from edge import signing

TRUST_FILE = "trust.json"
AUDIT_LOG = "audit.log"

log = logging.getLogger("cmdfed.edge")


def trusted_keys(home: str | Path) -> dict[str, Ed25519PublicKey]:
    """{key_id: public key} the home trusts; empty when it has no trust policy."""
    path = Path(home) / TRUST_FILE
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())["keys"]
        keys = {}
        for kid, record in records.items():
            key = serialization.load_pem_public_key(record["public_key"].encode())
            if not isinstance(key, Ed25519PublicKey) or signing.key_id(key) != kid:
                raise ValueError(f"key {kid} is not the ed25519 key it names")
            keys[kid] = key
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # Never fall back to "no policy": a damaged trust file must not lower trust.
        raise CmdfedError(
            f"{path} is damaged ({exc}); nothing is deployed until it is repaired: restore it from a backup or "
            f"delete it and add the publisher's key again with `cmdfed edge trust add KEY --home {home}`"
        ) from exc
    if not keys:
        raise CmdfedError(f"{path} lists no key; delete it or add one with `cmdfed edge trust add KEY --home {home}`")
    return keys


def describe(home: str | Path) -> list[dict]:
    """The trusted keys with when and how each was added (for ``edge trust list``)."""
    path = Path(home) / TRUST_FILE
    trusted_keys(home)  # validates
    if not path.is_file():
        return []
    records = json.loads(path.read_text())["keys"]
    return [{"key_id": kid, "added_at": r.get("added_at"), "how": r.get("how")} for kid, r in sorted(records.items())]


def add_key(home: str | Path, public_key: Ed25519PublicKey, how: str) -> tuple[str, bool]:
    """Trust ``public_key`` in ``home`` (call under the home's lock); (key_id, newly added)."""
    home = Path(home)
    kid = signing.key_id(public_key)
    keys = trusted_keys(home)
    if kid in keys:
        return kid, False
    records = json.loads((home / TRUST_FILE).read_text())["keys"] if keys else {}
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    records[kid] = {"public_key": pem.decode(), "added_at": _now(), "how": how}
    write_json_atomic(home / TRUST_FILE, {"keys": records})
    audit(home, "trust_key_added", key_id=kid, how=how)
    log.warning("edge home %s now trusts key %s (%s)", home, kid, how)
    return kid, True


def remove_key(home: str | Path, kid: str) -> None:
    """Stop trusting ``kid`` (call under the home's lock); the last key cannot be removed."""
    home = Path(home)
    keys = trusted_keys(home)
    if kid not in keys:
        raise CmdfedError(f"{home} does not trust a key {kid}; trusted: {', '.join(sorted(keys)) or 'none'}")
    if len(keys) == 1:
        raise CmdfedError(
            f"{kid} is the only key {home} trusts, and a home that checks signatures keeps checking them: "
            "add the publisher's new key first (`cmdfed edge trust add NEW.pub`), then remove this one"
        )
    records = json.loads((home / TRUST_FILE).read_text())["keys"]
    del records[kid]
    write_json_atomic(home / TRUST_FILE, {"keys": records})
    audit(home, "trust_key_removed", key_id=kid)
    log.warning("edge home %s no longer trusts key %s", home, kid)


def audit(home: str | Path, event: str, **fields) -> None:
    """Append one line to HOME/audit.log (flushed to disk before the change it records)."""
    record = {"at": _now(), "event": event, "user": _user(), **fields}
    path = Path(home) / AUDIT_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def audit_entries(home: str | Path) -> list[dict]:
    path = Path(home) / AUDIT_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
