"""TLS and SuperNode authentication with real processes on 127.0.0.1: a SuperLink serving
TLS with a `cmdfed certs init` certificate and admitting registered sites only; a site
whose key was registered joins over TLS, one whose key was not is refused."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
from cryptography import x509

from client.supernode import SuperNode
from cmdfed.data.synth import write_synthetic_store
from cmdfed.errors import CmdfedError
from cmdfed.federation.processes import flower_env, flower_executable, free_port
from cmdfed.federation.site import SiteSettings
from server.federate import CONNECTION, write_connection
from server.superlink import SuperLink


def cmdfed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmdfed", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_certs_init_makes_a_ca_and_a_server_certificate_for_the_hosts(tmp_path):
    result = cmdfed("certs", "init", str(tmp_path / "certs"), "--host", "127.0.0.1", "--host", "myserver.org")
    assert result.returncode == 0, result.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["myserver.org"]
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE(os.stat(tmp_path / "certs" / key).st_mode) == 0o600
    again = cmdfed("certs", "init", str(tmp_path / "certs"), "--host", "127.0.0.1")
    assert again.returncode == 1 and "--force" in again.stderr


def test_server_start_checks_its_certificates_and_plaintext_needs_insecure(tmp_path, synthetic_store):
    result = cmdfed(
        "server", "start", "--run-dir", str(tmp_path), "--host", "10.1.2.3", "--certs", str(tmp_path / "none")
    )
    assert result.returncode == 1 and "lacks ca.crt" in " ".join(result.stderr.split())
    result = cmdfed("server", "start", "--run-dir", str(tmp_path), "--host", "10.1.2.3")
    message = " ".join(result.stderr.split())
    assert (
        result.returncode == 1
        and "TLS is not configured" in message
        and "--certs DIR" in message
        and "--insecure" in message
    )
    # A real store, so the site's store check passes and the refusal is the plaintext one.
    result = cmdfed("client", "start", "--store", str(synthetic_store), "--name", "a", "--superlink", "10.1.2.3:9092")
    message = " ".join(result.stderr.split())
    assert result.returncode == 1 and "SuperLink 10.1.2.3 is not this machine and TLS is not configured" in message
    assert "pass --ca with the federation's ca.crt" in message and "pass --insecure" in message


def supernode_ids(superlink: SuperLink, ca, tmp_path) -> dict[str, str]:
    env = flower_env(tmp_path / "flwr-ls")
    write_connection(tmp_path / "flwr-ls", superlink.address, ca)
    result = subprocess.run(
        [flower_executable("flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return {n["node-id"]: n["status"] for n in json.loads(result.stdout)["nodes"]}


@pytest.mark.slow
def test_a_registered_site_joins_over_tls_and_an_unregistered_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    assert cmdfed("certs", "init", str(tmp_path / "certs"), "--host", "127.0.0.1").returncode == 0
    ca = tmp_path / "certs" / "ca.crt"
    for site in ("a", "b"):
        result = cmdfed("client", "keygen", "--out", str(tmp_path / f"{site}-key"))
        assert result.returncode == 0, result.stderr
    public = (tmp_path / "a-key.pub").read_bytes()
    assert public.startswith(b"ecdsa-sha2-nistp384 ")
    write_synthetic_store(tmp_path / "site.zarr", 4, site=1, seed=1, tile_size=64)

    superlink = SuperLink(tmp_path / "run", port=free_port(), certs=tmp_path / "certs", site_auth=True).start()
    nodes = []
    try:
        result = cmdfed(
            "server",
            "register-site",
            str(tmp_path / "a-key.pub"),
            "--name",
            "site-a",
            "--superlink",
            superlink.address,
            "--ca",
            str(ca),
        )
        assert result.returncode == 0, result.stdout + result.stderr
        registered = supernode_ids(superlink, ca, tmp_path)
        assert len(registered) == 1

        for site in ("a", "b"):
            settings = SiteSettings(tmp_path / "site.zarr", f"site-{site}", tmp_path / f"work-{site}", device="cpu")
            nodes.append(SuperNode(settings, superlink.address, ca=ca, key=tmp_path / f"{site}-key"))
        nodes[0].start()
        try:  # the stranger is refused: at its start, or moments after, whichever comes first
            nodes[1].start()
        except CmdfedError as exc:
            assert "Failed to activate SuperNode" in str(exc) and "cmdfed server register-site" in str(exc)
        deadline = time.monotonic() + 90
        while nodes[1].process.poll() is None or set(supernode_ids(superlink, ca, tmp_path).values()) != {"online"}:
            assert time.monotonic() < deadline, (
                "the registered site did not come online or the stranger was not refused"
            )
            time.sleep(1.0)
        assert nodes[0].process.poll() is None  # the registered site stays connected
        assert nodes[1].process.returncode != 0 and "Failed to activate SuperNode" in nodes[1].log_path.read_text()
        assert supernode_ids(superlink, ca, tmp_path) == {next(iter(registered)): "online"}
    finally:
        for node in nodes:
            node.stop()
        superlink.stop()
