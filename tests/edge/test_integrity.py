"""Fault injection on an edge home (issue #14, findings 2 and 3): each broken input, the
refusal it gets, and nothing written or lost."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from cmdfed.errors import CmdfedError
from edge.cli import commands
from edge.deploy import add_trusted_key, deploy, read_state, remove_trusted_key, rollback, status
from edge.infer import infer_slide
from edge.service import EdgeService
from edge.signing import generate_key_pair, key_id, load_public_key
from edge.trust import audit_entries


def _snapshot(home):
    """Every file of the home (but the lock) with its bytes: what a refusal must leave as it was."""
    return {
        str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def _edited_keeping_signature(bundle, tmp_path, name, edit):
    """A copy whose manifest.json ``edit`` changed, with the original manifest.sig kept."""
    copy = tmp_path / name
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _unsigned(bundle, tmp_path, name="unsigned"):
    copy = tmp_path / name
    shutil.copytree(bundle, copy)
    (copy / "manifest.sig").unlink()
    return copy


@pytest.fixture
def trusting_home(signed_bundle, keys, tmp_path):
    """A home whose first deploy gave --trust-key: it trusts the publisher's key from then on."""
    home = tmp_path / "trusting"
    deploy(signed_bundle, home, trust_key=keys[1])
    return home


def _flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def own_home(signed_bundle, tmp_path):
    home = tmp_path / "home"
    deploy(signed_bundle, home)
    return home


# -- finding 3: the installed model is verified at every load -----------------------------


def test_a_flipped_byte_in_the_installed_model_is_refused_by_infer_and_serve(own_home, slide_tiff, tmp_path):
    version = read_state(own_home)["active"]
    onnx = own_home / "models" / version / "model.onnx"
    _flip_byte(onnx)
    assert "model.onnx" in status(own_home)["problem"]
    out = tmp_path / "out"
    with pytest.raises(CmdfedError, match=r"model\.onnx.*cmdfed edge status --home"):
        infer_slide(slide_tiff, own_home, out)
    assert not out.exists()
    with pytest.raises(CmdfedError, match=r"model\.onnx.*cmdfed edge status --home"):
        EdgeService(own_home, port=0)
    for forced in ("onnxruntime-cpu",):  # a forced backend gets the same refusal, not a fallback
        with pytest.raises(CmdfedError, match="damaged"):
            infer_slide(slide_tiff, own_home, out, backend=forced)
    assert read_state(own_home)["active"] == version  # nothing changed in the home


# -- finding 2: an edge home's trust cannot be lowered without a key -----------------------


def test_a_tampered_manifest_with_its_old_signature_is_refused_without_trust_key(
    trusting_home, signed_bundle, keys, tmp_path
):
    assert status(trusting_home)["trusted_keys"] == [key_id(load_public_key(keys[1]))]
    before = _snapshot(trusting_home)
    retiled = _edited_keeping_signature(
        signed_bundle, tmp_path, "retiled", lambda m: m["preprocessing"].update(tile_size=512)
    )
    renamed = _edited_keeping_signature(
        signed_bundle, tmp_path, "renamed", lambda m: m["model"].update(version="evil-v2")
    )
    for tampered in (retiled, renamed):
        with pytest.raises(CmdfedError, match="changed after signing.*--allow-unsigned"):
            deploy(tampered, trusting_home)  # no --trust-key: the home's key is used
    assert _snapshot(trusting_home) == before


def test_status_says_verified_only_after_a_real_signature_check(signed_bundle, keys, tmp_path):
    home = tmp_path / "no-key"
    tampered = _edited_keeping_signature(
        signed_bundle, tmp_path, "t", lambda m: m["preprocessing"].update(tile_size=512)
    )
    deploy(tampered, home)  # a home that trusts no key cannot check a signature...
    info = status(home)
    assert info["signed"] and info["intact"] and not info["verified"]  # ...and no longer says it did
    assert info["signature"].startswith("not checked") and info["trusted_keys"] == []
    # A home that trusts the key checks it: the installed manifest edited after the deploy is caught.
    home = tmp_path / "keyed"
    version = deploy(signed_bundle, home, trust_key=keys[1])["version"]
    assert status(home)["verified"] and status(home)["signature"].startswith("valid")
    installed = home / "models" / version / "manifest.json"
    installed.write_text(installed.read_text().replace('"tile_size": 128', '"tile_size": 512'))
    info = status(home)
    assert info["intact"] and not info["verified"] and "changed after signing" in info["signature"]


def test_an_unsigned_copy_does_not_replace_a_signed_one_without_the_flag(trusting_home, signed_bundle, tmp_path):
    version = read_state(trusting_home)["active"]
    before = _snapshot(trusting_home)
    unsigned = _unsigned(signed_bundle, tmp_path)
    with pytest.raises(CmdfedError, match="not signed.*--allow-unsigned"):
        deploy(unsigned, trusting_home)
    assert _snapshot(trusting_home) == before and status(trusting_home)["verified"]
    # The operator's explicit flag lets it in, and the home records that it did.
    result = deploy(unsigned, trusting_home, allow_unsigned=True)
    assert result["version"] == version and not result["signature_checked"]
    info = status(trusting_home)
    assert not info["signed"] and not info["verified"] and info["signature"].startswith("unsigned")
    assert info["trusted_keys"]  # the policy stays: the next unsigned deploy is refused again
    [entry] = [e for e in audit_entries(trusting_home) if e["event"] == "deploy_without_verified_signature"]
    assert entry["version"] == version and entry["replaced_signed_copy"]


def test_a_home_without_a_key_keeps_a_signed_copy_from_an_unchecked_one(signed_bundle, keys, tmp_path):
    home = tmp_path / "home"
    version = deploy(signed_bundle, home)["version"]  # signed, but no key to check it with
    before = _snapshot(home)
    for copy in (
        _unsigned(signed_bundle, tmp_path),
        _edited_keeping_signature(signed_bundle, tmp_path, "t", lambda m: m["preprocessing"].update(overlap=0)),
    ):
        with pytest.raises(CmdfedError, match=f"version {version} is installed .* with a signature.*--trust-key"):
            deploy(copy, home)
    assert _snapshot(home) == before


def test_a_brought_key_cannot_replace_the_trusted_one(trusting_home, signed_bundle, tmp_path):
    other_private, other_public = generate_key_pair(tmp_path / "attacker")
    from edge.export import export_bundle  # noqa: F401  (the attacker's bundle: the same one, re-signed)
    from edge.signing import load_private_key, sign

    resigned = tmp_path / "resigned"
    shutil.copytree(signed_bundle, resigned)
    record = sign((resigned / "manifest.json").read_bytes(), load_private_key(other_private))
    (resigned / "manifest.sig").write_text(json.dumps(record))
    before = _snapshot(trusting_home)
    with pytest.raises(CmdfedError, match="is not a key .* trusts.*edge trust add"):
        deploy(resigned, trusting_home, trust_key=other_public)
    with pytest.raises(CmdfedError, match="signed by key .* but the trusted key is"):
        deploy(resigned, trusting_home)
    assert _snapshot(trusting_home) == before
    # Adding the key is an explicit, logged step; then its bundles deploy.
    add_trusted_key(trusting_home, other_public)
    assert deploy(resigned, trusting_home)["signer"] == key_id(load_public_key(other_public))
    assert [e["event"] for e in audit_entries(trusting_home)] == ["trust_key_added", "trust_key_added"]


def test_trust_added_later_applies_to_every_deploy_and_rollback(signed_bundle, keys, tmp_path):
    home = tmp_path / "home"
    old = deploy(_unsigned(signed_bundle, tmp_path), home)["version"]  # before the home trusted any key
    result = CliRunner().invoke(commands, ["trust", "add", str(keys[1]), "--home", str(home)])
    assert result.exit_code == 0, result.output
    second = _edited_keeping_signature(signed_bundle, tmp_path, "v2", lambda m: m["model"].update(version="ft-v2"))
    (second / "manifest.sig").unlink()
    with pytest.raises(CmdfedError, match="not signed"):
        deploy(second, home)
    deploy(second, home, allow_unsigned=True)
    with pytest.raises(CmdfedError, match="rolls back only to bundles they signed"):
        rollback(home)  # the previous version is unsigned too
    assert read_state(home)["active"] == "ft-v2"
    assert rollback(home, allow_unsigned=True)["active"] == old
    # The last key cannot be removed: a home that checks signatures keeps checking them.
    with pytest.raises(CmdfedError, match="only key"):
        remove_trusted_key(home, key_id(load_public_key(keys[1])))
    listed = CliRunner().invoke(commands, ["trust", "list", "--home", str(home), "--json"])
    assert json.loads(listed.output)["trusted"][0]["key_id"] == key_id(load_public_key(keys[1]))


def test_a_damaged_trust_file_refuses_rather_than_trusting_nothing(trusting_home, signed_bundle, tmp_path):
    (trusting_home / "trust.json").write_text("{")
    with pytest.raises(CmdfedError, match="trust.json is damaged"):
        deploy(_unsigned(signed_bundle, tmp_path), trusting_home)
