"""Installing bundles on a workstation: verify, install, activate atomically, roll back.

Layout of the edge home folder::

    HOME/models/<version>/   one verified bundle per installed version
    HOME/engines/<key>/      TensorRT engines built here (see tensorrt.py)
    HOME/state.json          {"active": version, "history": [older actives, newest last]}
    HOME/trust.json          the publishers' public keys this home trusts (see trust.py)
    HOME/audit.log           trust changes, and bundles let in with --allow-unsigned
    HOME/.lock               serialises deploy/rollback/trust changes between processes

Order of a deploy: the bundle (folder or .tar, read in place) is verified first, signature (against
the home's trusted keys: trust.py) then checksums; a refused bundle writes nothing. It is then
copied to a hidden staging folder under ``models/``, verified again there (the copy is what will
run), loaded with the backend this workstation would use and checked on its golden data, and only
then renamed to ``models/<version>``. A version names one set of weights: a bundle of the same
weights exported again (other post-processing, or now signed) replaces the installed copy the same
way; the old copy is moved aside only once the new one has passed its checks. Activation is one
atomic replace of ``state.json``, so a reader sees the old or the new version, never a mix; the
previous version stays installed for ``rollback``. The newest ``KEEP_VERSIONS`` versions are kept,
older ones deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
from pathlib import Path

from cmdfed.atomic import exclusive_lock, replace_dir, write_json_atomic
from cmdfed.errors import CmdfedError
from cmdfed.progress import Progress, report
from edge import bundle, signing, trust
from edge.selection import kept_choices, select_backend

log = logging.getLogger("cmdfed.edge")

STATE_FILE = "state.json"
LOCK_FILE = ".lock"  # held while the home changes, so two deploys or rollbacks never interleave
KEEP_VERSIONS = 3


def deploy(
    bundle_path: str | Path,
    home: str | Path,
    *,
    trust_key: str | Path | None = None,
    allow_unsigned: bool = False,
    backend: str | None = None,
    trt_source: str = "onnx",
    telemetry: str | Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Verify, install and activate a bundle; returns the new state and the backend check.

    The signature is checked against the home's trusted keys (edge/trust.py), or against
    ``trust_key`` in a home that trusts none yet, which then trusts it. ``allow_unsigned``
    lets in a bundle without a valid signature by a trusted key, and is written to the
    home's audit log.
    """
    given = signing.load_public_key(trust_key) if trust_key else None
    home = Path(home)
    with bundle.BundleSource(bundle_path) as source:
        report(progress, 0, 3, "verifying")
        keys = _verifying_keys(home, given)
        signer = _check_signature(source, keys, home, allow_unsigned)
        manifest = bundle.verify_bundle(source)
        version = manifest["model"]["version"]
        with exclusive_lock(home / LOCK_FILE):
            if _verifying_keys(home, given).keys() != keys.keys():  # the policy changed while we verified
                keys = _verifying_keys(home, given)
                signer = _check_signature(source, keys, home, allow_unsigned)
            report(progress, 1, 3, "installing and checking the backend")
            selection = _install(source, manifest, home, keys, signer, allow_unsigned, backend, trt_source)
            if given is not None and not trust.trusted_keys(home):
                trust.add_key(home, given, how=f"first deploy with --trust-key ({version})")
            report(progress, 2, 3, "activating")
            state = _activate(home, version)
    report(progress, 3, 3, "active")
    if telemetry:
        _record(telemetry, version, selection.backend.name, selection.backend.device, "active")
    return {
        "version": version,
        "signature_checked": signer is not None,
        "signer": signer,
        **state,
        "backend": selection.report(),
    }


def rollback(home: str | Path, *, allow_unsigned: bool = False, telemetry: str | Path | None = None) -> dict:
    """Make the previous version active again (checked like a deploy: checksums, and the
    signature when the home trusts a key)."""
    home = Path(home)
    with exclusive_lock(home / LOCK_FILE):
        state = read_state(home)
        if not state["history"]:
            raise CmdfedError(f"{home} has no previous version to roll back to (active: {state['active']})")
        previous = state["history"][-1]
        source = bundle.BundleSource(home / "models" / previous)
        bundle.verify_bundle(source)
        keys = trust.trusted_keys(home)
        if _check_signature(source, keys, home, allow_unsigned, action="rolls back only to") is None and keys:
            trust.audit(home, "rollback_without_verified_signature", version=previous)
        new_state = {"active": previous, "history": state["history"][:-1]}
        write_json_atomic(home / STATE_FILE, new_state)
    if telemetry:
        _record(telemetry, previous, "unchanged", None, "rolled_back")
    return {"rolled_back_from": state["active"], **new_state}


def add_trusted_key(home: str | Path, key_path: str | Path) -> dict:
    """``edge trust add``: trust a publisher's public key in this home (logged)."""
    public_key = signing.load_public_key(key_path)
    with exclusive_lock(Path(home) / LOCK_FILE):
        kid, added = trust.add_key(home, public_key, how=f"edge trust add {key_path}")
    return {"key_id": kid, "added": added, "trusted": trust.describe(home)}


def remove_trusted_key(home: str | Path, kid: str) -> dict:
    """``edge trust remove``: stop trusting a key (never the last one; logged)."""
    with exclusive_lock(Path(home) / LOCK_FILE):
        trust.remove_key(home, kid)
    return {"removed": kid, "trusted": trust.describe(home)}


def _verifying_keys(home: Path, given) -> dict:
    """The keys a bundle must be signed by here: the home's, or ``given`` in a home without any."""
    keys = trust.trusted_keys(home)
    if given is None:
        return keys
    kid = signing.key_id(given)
    if keys and kid not in keys:
        raise CmdfedError(
            f"--trust-key {kid} is not a key {home} trusts (it trusts {', '.join(sorted(keys))}); a deploy cannot "
            f"change whom the home trusts: add the key with `cmdfed edge trust add KEY --home {home}` (logged), "
            "or deploy without --trust-key"
        )
    return keys or {kid: given}


def _check_signature(source, keys: dict, home: Path, allow_unsigned: bool, action: str = "deploys only") -> str | None:
    """The trusted signer's key id; None when no key is required (a home without trust) or
    when ``allow_unsigned`` lets a bundle without a valid signature in (logged)."""
    if not keys:
        return None
    try:
        return bundle.check_signature(source, keys)
    except CmdfedError as exc:
        if not allow_unsigned:
            raise CmdfedError(
                f"{exc}. {home} trusts key(s) {', '.join(sorted(keys))} and {action} bundles they signed; "
                "get a signed bundle from its publisher, or pass --allow-unsigned to accept this one anyway "
                f"(recorded in {home / trust.AUDIT_LOG})"
            ) from exc
        log.warning("--allow-unsigned: accepting %s without a valid signature by a trusted key (%s)", source.path, exc)
        return None


def read_state(home: Path) -> dict:
    path = home / STATE_FILE
    if not path.is_file():
        raise CmdfedError(f"nothing is deployed in {home}; run `cmdfed edge deploy BUNDLE --home {home}` first")
    try:
        state = json.loads(path.read_text())
        return {"active": str(state["active"]), "history": [str(v) for v in state["history"]]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CmdfedError(f"{path} is damaged ({exc}); redeploy a bundle to repair it") from exc


def active_bundle(home: str | Path) -> Path:
    """The folder of the active version."""
    home = Path(home)
    folder = home / "models" / read_state(home)["active"]
    if not (folder / bundle.MANIFEST).is_file():
        raise CmdfedError(f"the active version's folder {folder} is missing; redeploy or roll back")
    return folder


def status(home: str | Path) -> dict:
    """What is active and whether it can be trusted: ``intact`` (files match the manifest's
    checksums) and ``verified`` (intact, and its signature checked now against a key this
    home trusts; never from the mere presence of manifest.sig)."""
    home = Path(home)
    state = read_state(home)
    folder = home / "models" / state["active"]
    try:
        manifest = bundle.verify_bundle(bundle.BundleSource(folder))
        intact, problem = True, None
    except CmdfedError as exc:
        manifest, intact, problem = _readable_manifest(folder), False, f"{exc}; redeploy the bundle or roll back"
    signed = (folder / bundle.SIGNATURE).is_file()
    try:
        keys = trust.trusted_keys(home)
    except CmdfedError as exc:
        keys, signature, checked = {}, f"not checked: {exc}", False
    else:
        signature, checked = _signature_status(folder, keys, signed, home)
    models = home / "models"
    engines = home / "engines"
    return {
        "home": str(home),
        "active": state["active"],
        "previous": state["history"],
        "installed": sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")),
        "intact": intact,
        "verified": intact and checked,
        "problem": problem,
        "signed": signed,
        "signature": signature,
        "trusted_keys": sorted(keys),
        "created_at": manifest.get("created_at"),
        "class_names": manifest.get("model", {}).get("class_names"),
        "tile_size": manifest.get("preprocessing", {}).get("tile_size"),
        "overlap": manifest.get("preprocessing", {}).get("overlap"),
        "engines": sorted(p.name for p in engines.iterdir()) if engines.is_dir() else [],
        # Each variant's export gate; which graph actually runs is measured at load (deploy, serve, infer report it).
        "variants": {name: record.get("gate") for name, record in manifest.get("variants", {}).items()},
        # Which CPU graph later jobs run, as deploy (or a job with other settings) timed them.
        "cpu_graph_choices": kept_choices(home, manifest) if "files" in manifest else [],
    }


def _signature_status(folder: Path, keys: dict, signed: bool, home: Path) -> tuple[str, bool]:
    if not keys:
        return (
            (
                "not checked: this home trusts no key (add the publisher's with `cmdfed edge trust add KEY --home "
                f"{home}`)"
            ),
            False,
        )
    if not signed:
        return "unsigned (let in with --allow-unsigned; see audit.log)", False
    try:
        return f"valid, by trusted key {bundle.check_signature(bundle.BundleSource(folder), keys)}", True
    except CmdfedError as exc:
        return f"INVALID: {exc}", False


def _readable_manifest(folder: Path) -> dict:
    """What can still be read of a damaged bundle's manifest, for ``status``."""
    try:
        manifest = json.loads((folder / bundle.MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _audit_unverified(
    home: Path, version: str, source: bundle.BundleSource, keys: dict, *, replaced_signed_copy: bool
) -> None:
    """Record in the audit log that ``version`` was deployed without a checked signature."""
    trust.audit(
        home,
        "deploy_without_verified_signature",
        version=version,
        bundle=str(source.path),
        trusted_keys=sorted(keys),
        replaced_signed_copy=replaced_signed_copy,
    )


def _install(
    source: bundle.BundleSource,
    manifest: dict,
    home: Path,
    keys: dict,
    signer: str | None,
    allow_unsigned: bool,
    backend: str | None,
    trt_source: str,
):
    """Install (or find installed) the bundle and check it runs here; returns the backend selection."""
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    version = manifest["model"]["version"]
    target = models / version
    if target.exists() and _same_bundle(target, source):
        bundle.verify_bundle(bundle.BundleSource(target), keys if signer else None)
        selection = select_backend(target, home, force=backend, trt_source=trt_source, retime=True)
        if signer is None and keys:
            _audit_unverified(home, version, source, keys, replaced_signed_copy=False)
        return selection
    replaces_signed = target.exists() and (target / bundle.SIGNATURE).is_file()
    if replaces_signed and signer is None and not allow_unsigned:
        # A signed copy is replaced only by one whose signature was checked: otherwise an
        # unsigned (or tampered) "re-export" of the same version would lower its trust silently.
        raise CmdfedError(
            f"version {version} is installed in {home} with a signature, and this copy's signature was not checked "
            "(it is unsigned, or no trusted key was given); give the publisher's key with --trust-key, "
            f"or pass --allow-unsigned to replace it anyway (recorded in {home / trust.AUDIT_LOG})"
        )
    staging = Path(tempfile.mkdtemp(prefix=f".incoming-{target.name}-", dir=models))
    try:
        staging.rmdir()
        source.copy_to(staging)
        staged = bundle.BundleSource(staging)
        bundle.verify_bundle(staged, keys if signer else None)  # the copy is what will run
        # A bundle this workstation cannot run correctly is refused before it is installed.
        selection = select_backend(staging, home, force=backend, trt_source=trt_source, retime=True)
        if signer is None and (keys or replaces_signed):
            _audit_unverified(home, version, source, keys, replaced_signed_copy=replaces_signed)
        replace_dir(staging, target)  # a re-export of the same weights (other settings, or now signed) replaces it
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return selection


def _same_bundle(installed: Path, source: bundle.BundleSource) -> bool:
    try:
        return (installed / bundle.MANIFEST).read_bytes() == source.read_bytes(bundle.MANIFEST) and (
            (installed / bundle.SIGNATURE).is_file() == (bundle.SIGNATURE in source.names)
        )
    except OSError:
        return False


def _activate(home: Path, version: str) -> dict:
    try:
        state = read_state(home)
    except CmdfedError:
        if (home / STATE_FILE).exists():
            raise
        state = {"active": None, "history": []}
    if state["active"] != version:
        history = [v for v in state["history"] if v != version]
        if state["active"] is not None:
            history.append(state["active"])
        state = {"active": version, "history": history[-(KEEP_VERSIONS - 1) :]}
        write_json_atomic(home / STATE_FILE, state)
    _prune(home, keep={state["active"], *state["history"]})
    return state


def _prune(home: Path, keep: set[str]) -> None:
    """Delete versions no longer kept, and what an interrupted install left (hidden staging
    and set-aside folders); runs under the home's lock, so no install is under way."""
    for folder in (home / "models").iterdir():
        if folder.is_dir() and (folder.name.startswith(".") or folder.name not in keep):
            shutil.rmtree(folder, ignore_errors=True)


def _record(telemetry, version: str, backend: str, gpu: str | None, status: str) -> None:
    from cmdfed.telemetry import TelemetryStore

    with TelemetryStore.open(telemetry, create=True) as store:
        store.record_deployment(socket.gethostname(), version=version, backend=backend, gpu=gpu, status=status)
