"""Installing bundles on a workstation: verify, install, activate atomically, roll back.

Layout of the edge home folder::

    HOME/models/<version>/   one verified bundle per installed version
    HOME/engines/<key>/      TensorRT engines built here (see tensorrt.py)
    HOME/state.json          {"active": version, "history": [older actives, newest last]}
    HOME/.lock               serialises deploy/rollback between processes

Order of a deploy: the bundle (folder or .tar, read in place) is verified first, signature
then checksums; a refused bundle writes nothing. It is then copied to a hidden staging
folder under ``models/``, verified again there (the copy is what will run), loaded with
the backend this workstation would use and checked on its golden data, and only then
renamed to ``models/<version>``. A version names one set of weights: a bundle of the same
weights exported again (other post-processing, or now signed) replaces the installed copy
the same way; the old copy is moved aside only once the new one has passed its checks. Activation is one atomic replace of ``state.json``, so a
reader sees the old or the new version, never a mix; the previous version stays installed
for ``rollback``. The newest ``KEEP_VERSIONS`` versions are kept, older ones deleted.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from pathlib import Path

from cmdfed.atomic import exclusive_lock, replace_dir, write_json_atomic
from cmdfed.errors import CmdfedError
from cmdfed.progress import Progress, report
from edge import bundle, signing
from edge.selection import select_backend

STATE_FILE = "state.json"
LOCK_FILE = ".lock"  # held while the home changes, so two deploys or rollbacks never interleave
KEEP_VERSIONS = 3


def deploy(
    bundle_path: str | Path,
    home: str | Path,
    *,
    trust_key: str | Path | None = None,
    backend: str | None = None,
    trt_source: str = "onnx",
    telemetry: str | Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Verify, install and activate a bundle; returns the new state and the backend check."""
    public_key = signing.load_public_key(trust_key) if trust_key else None
    home = Path(home)
    with bundle.BundleSource(bundle_path) as source:
        report(progress, 0, 3, "verifying")
        manifest = bundle.verify_bundle(source, public_key)
        version = manifest["model"]["version"]
        with exclusive_lock(home / LOCK_FILE):
            report(progress, 1, 3, "installing and checking the backend")
            selection = _install(source, manifest, home, public_key, backend, trt_source)
            report(progress, 2, 3, "activating")
            state = _activate(home, version)
    report(progress, 3, 3, "active")
    if telemetry:
        _record(telemetry, version, selection.backend.name, selection.backend.device, "active")
    return {"version": version, "signature_checked": public_key is not None, **state, "backend": selection.report()}


def rollback(home: str | Path, *, telemetry: str | Path | None = None) -> dict:
    """Make the previous version active again."""
    home = Path(home)
    with exclusive_lock(home / LOCK_FILE):
        state = read_state(home)
        if not state["history"]:
            raise CmdfedError(f"{home} has no previous version to roll back to (active: {state['active']})")
        previous = state["history"][-1]
        bundle.verify_bundle(bundle.BundleSource(home / "models" / previous))
        new_state = {"active": previous, "history": state["history"][:-1]}
        write_json_atomic(home / STATE_FILE, new_state)
    if telemetry:
        _record(telemetry, previous, "unchanged", None, "rolled_back")
    return {"rolled_back_from": state["active"], **new_state}


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
    home = Path(home)
    state = read_state(home)
    folder = home / "models" / state["active"]
    try:
        manifest = bundle.verify_bundle(bundle.BundleSource(folder))
        verified, problem = True, None
    except CmdfedError as exc:
        manifest, verified, problem = _readable_manifest(folder), False, f"{exc}; redeploy the bundle or roll back"
    models = home / "models"
    engines = home / "engines"
    return {
        "home": str(home),
        "active": state["active"],
        "previous": state["history"],
        "installed": sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")),
        "verified": verified,
        "problem": problem,
        "signed": (folder / bundle.SIGNATURE).is_file(),
        "created_at": manifest.get("created_at"),
        "class_names": manifest.get("model", {}).get("class_names"),
        "tile_size": manifest.get("preprocessing", {}).get("tile_size"),
        "overlap": manifest.get("preprocessing", {}).get("overlap"),
        "engines": sorted(p.name for p in engines.iterdir()) if engines.is_dir() else [],
    }


def _readable_manifest(folder: Path) -> dict:
    """What can still be read of a damaged bundle's manifest, for ``status``."""
    try:
        manifest = json.loads((folder / bundle.MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _install(source: bundle.BundleSource, manifest: dict, home: Path, public_key, backend: str | None, trt_source: str):
    """Install (or find installed) the bundle and check it runs here; returns the backend selection."""
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / manifest["model"]["version"]
    if target.exists() and _same_bundle(target, source):
        bundle.verify_bundle(bundle.BundleSource(target), public_key)
        return select_backend(target, home, force=backend, trt_source=trt_source)
    staging = Path(tempfile.mkdtemp(prefix=f".incoming-{target.name}-", dir=models))
    try:
        staging.rmdir()
        source.copy_to(staging)
        bundle.verify_bundle(bundle.BundleSource(staging), public_key)
        # A bundle this workstation cannot run correctly is refused before it is installed.
        selection = select_backend(staging, home, force=backend, trt_source=trt_source)
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
        state = {"active": version, "history": history[-(KEEP_VERSIONS - 1):]}
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
