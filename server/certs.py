"""``cmdfed certs init``: the federation's own certificate authority and the server's certificate.

Weights travel between hospitals and the server, so the SuperLink speaks TLS. A federation
rarely has a certificate from a public CA for its server, and does not need one: the
server's operator makes a small CA once, gives its certificate (``ca.crt``, public) to
every site, and the SuperLink presents a certificate that CA signed for the names and
addresses sites connect to (subject alternative names: ``--host``, repeatable). Sites
then verify the server with ``cmdfed client start --ca ca.crt``.

Files written in ``DIR`` (keys readable by the owner only, every file atomically)::

    ca.crt  ca.key          the CA (keep ca.key offline once the server certificate exists)
    server.crt  server.key  the SuperLink's certificate and key (`cmdfed server start --certs DIR`)

Keys are ECDSA P-384; the CA is valid ten years, the server certificate ``--days``.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cmdfed.atomic import write_bytes_atomic
from cmdfed.cli import console
from cmdfed.errors import CmdfedError
from cmdfed.federation.keys import write_private_key

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"

commands = typer.Typer(help="Certificates for TLS between the federation server and its sites.", no_args_is_help=True)


@commands.command("init")
def init(
    directory: Path = typer.Argument(..., help="Folder for ca.crt, ca.key, server.crt, server.key (created)."),
    hosts: list[str] = typer.Option(
        ..., "--host", help="A name or IP address sites use to reach the server (repeatable)."
    ),
    days: int = typer.Option(825, help="Validity of the server certificate in days."),
    force: bool = typer.Option(False, "--force", help="Replace certificates already in DIR."),
) -> None:
    """Make a CA and a server certificate for HOSTs; give sites ca.crt, start the server with --certs DIR."""
    write_certificates(directory, hosts, days=days, force=force)
    console.print(f"CA and server certificate for {', '.join(hosts)} in {directory}; give sites {directory / CA_CERT}")


def write_certificates(directory: Path, hosts: list[str], *, days: int = 825, force: bool = False) -> None:
    if days <= 0:
        raise CmdfedError(f"--days must be positive, got {days}")
    names = [_subject_name(h) for h in hosts]
    existing = [name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY) if (directory / name).exists()]
    if existing and not force:
        raise CmdfedError(
            f"{directory} already holds {', '.join(existing)}; pass --force to replace them (sites then need the new "
            "ca.crt)"
        )
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cmdfed federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    directory.mkdir(parents=True, exist_ok=True)
    write_private_key(directory / CA_KEY, ca_key, serialization.PrivateFormat.PKCS8)
    write_private_key(directory / SERVER_KEY, server_key, serialization.PrivateFormat.PKCS8)
    write_bytes_atomic(directory / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_bytes_atomic(directory / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))


def server_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) of a ``certs init`` folder, checked to exist."""
    files = (directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CmdfedError(
            f"{directory} lacks {', '.join(missing)}; make them with `cmdfed certs init {directory} --host ...`"
        )
    return files


def _subject_name(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise CmdfedError("--host must not be empty")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
