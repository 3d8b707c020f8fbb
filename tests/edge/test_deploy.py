"""Deploy: verification before anything is written, atomic activation, rollback, status."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from cmdfed.errors import CmdfedError
from edge.deploy import deploy, read_state, rollback, status
from edge.signing import generate_key_pair


def _copy(bundle, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(bundle, target)
    return target


def test_signed_tar_deploys_with_the_right_key(signed_bundle, keys, tmp_path):
    result = deploy(signed_bundle.with_name("cmd.tar"), tmp_path / "home", trust_key=keys[1])
    assert result["signature_checked"] and result["active"] == result["version"]
    info = status(tmp_path / "home")
    assert info["verified"] and info["signed"] and info["installed"] == [result["version"]]


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("file", "does not match its checksum"),
        ("manifest", "changed after signing"),
        ("unsigned", "not signed"),
        ("extra", "files differ from the manifest"),
    ],
)
def test_tampered_or_unsigned_bundles_are_refused_and_nothing_installed(signed_bundle, keys, tmp_path, tamper, message):
    copy = _copy(signed_bundle, tmp_path)
    if tamper == "file":
        with open(copy / "golden.npz", "r+b") as f:
            f.seek(100)
            f.write(b"\x00\xff")
    elif tamper == "manifest":
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["preprocessing"]["tile_size"] = 512
        (copy / "manifest.json").write_text(json.dumps(manifest))
    elif tamper == "unsigned":
        (copy / "manifest.sig").unlink()
    else:
        (copy / "extra.py").write_text("print('hi')")
    with pytest.raises(CmdfedError, match=message):
        deploy(copy, tmp_path / "home", trust_key=keys[1])
    assert not (tmp_path / "home").exists()


def test_wrong_key_is_refused(signed_bundle, tmp_path):
    _, other_public = generate_key_pair(tmp_path / "other")
    with pytest.raises(CmdfedError, match="signed by key .* but the trusted key is"):
        deploy(signed_bundle, tmp_path / "home", trust_key=other_public)
    assert not (tmp_path / "home").exists()


def test_tar_with_a_path_escape_is_refused(signed_bundle, tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(signed_bundle / "manifest.json", arcname="cmd/../../manifest.json")
    with pytest.raises(CmdfedError, match="unexpected entries"):
        deploy(evil, tmp_path / "home")


def _edited(bundle, tmp_path, name, edit):
    """An unsigned copy of the bundle whose manifest ``edit`` changed in place."""
    copy = _copy(bundle, tmp_path, name)
    (copy / "manifest.sig").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _second_version(bundle, tmp_path):
    """The same files under another version name."""
    return _edited(bundle, tmp_path, "v2", lambda manifest: manifest["model"].update(version="ft-v2"))


def test_deploy_twice_then_rollback_switches_versions(signed_bundle, tmp_path):
    home = tmp_path / "home"
    first = deploy(signed_bundle, home)["version"]
    second = deploy(_second_version(signed_bundle, tmp_path), home)
    assert second["active"] == "ft-v2" and second["history"] == [first]
    assert status(home)["installed"] == sorted([first, "ft-v2"])
    assert rollback(home)["active"] == first
    assert read_state(home) == {"active": first, "history": []}
    with pytest.raises(CmdfedError, match="no previous version"):
        rollback(home)
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".")]  # no staging left


def test_status_without_a_deployment_says_what_to_do(tmp_path):
    with pytest.raises(CmdfedError, match="nothing is deployed"):
        status(tmp_path)


def test_the_same_weights_exported_again_replace_the_installed_copy(signed_bundle, tmp_path):
    home = tmp_path / "home"
    unsigned = _copy(signed_bundle, tmp_path, "unsigned")
    (unsigned / "manifest.sig").unlink()
    version = deploy(unsigned, home)["version"]
    assert not status(home)["signed"]
    assert deploy(signed_bundle, home)["version"] == version  # now signed: replaces, no error
    assert status(home)["signed"] and status(home)["installed"] == [version]
    retuned = _edited(
        signed_bundle, tmp_path, "retuned", lambda m: m["postprocessing"]["params"].update(sobel_kernel_size=21)
    )
    with pytest.raises(CmdfedError, match="installed .* with a signature"):  # unsigned does not replace signed unasked
        deploy(retuned, home)
    deploy(retuned, home, allow_unsigned=True)
    installed = json.loads((home / "models" / version / "manifest.json").read_text())
    assert installed["postprocessing"]["params"]["sobel_kernel_size"] == 21
    assert read_state(home) == {"active": version, "history": []}
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".")]


def test_a_version_that_is_not_a_plain_folder_name_is_refused(signed_bundle, tmp_path):
    crafted = _edited(
        signed_bundle, tmp_path, "crafted", lambda manifest: manifest["model"].update(version="../escaped")
    )
    with pytest.raises(CmdfedError, match="no valid model version"):
        deploy(crafted, tmp_path / "home" / "inner")
    assert not (tmp_path / "home" / "escaped").exists()


def test_status_of_a_damaged_active_version_says_what_to_do(signed_bundle, tmp_path):
    home = tmp_path / "home"
    version = deploy(signed_bundle, home)["version"]
    (home / "models" / version / "manifest.json").unlink()
    info = status(home)
    assert not info["intact"] and not info["verified"] and "redeploy the bundle or roll back" in info["problem"]


def test_a_failed_replacement_leaves_the_installed_copy_in_place(signed_bundle, tmp_path, monkeypatch):
    import os

    home = tmp_path / "home"
    version = deploy(signed_bundle, home)["version"]
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(src).startswith(".incoming-"):
            raise OSError("disk full (injected)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    retuned = _edited(
        signed_bundle, tmp_path, "retuned", lambda m: m["postprocessing"]["params"].update(sobel_kernel_size=21)
    )
    with pytest.raises(OSError, match="injected"):
        deploy(retuned, home, allow_unsigned=True)
    monkeypatch.undo()
    assert status(home)["intact"] and status(home)["signed"] and status(home)["active"] == version
    assert sorted(p.name for p in (home / "models").iterdir()) == [version]
    # What an install cut short by a crash leaves is cleared by the next deploy.
    (home / "models" / f".{version}.0badf00d.old").mkdir()
    deploy(signed_bundle, home)
    assert sorted(p.name for p in (home / "models").iterdir()) == [version]
