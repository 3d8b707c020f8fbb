"""Network addresses as the command line gives them (``host:port``), and which hosts are this
machine: shared by the federation's processes and the telemetry transport, which need the same
answer to "is this loopback, so plaintext is fine?"."""

from __future__ import annotations

from cmdfed.errors import CmdfedError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CmdfedError(f"address {address!r} must be host:port, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)
