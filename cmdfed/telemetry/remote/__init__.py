"""Telemetry over the network: edge workstations report to the federation's telemetry server.

    transport.py    the wire protocol: POST /v1/reports, JSON {"schema": 1, "reports": [...]},
                    "Authorization: Bearer <token>", HTTPS off loopback; why HTTPS + JSON
    tokens.py       per-workstation bearer tokens; the server keeps only their sha256
    ingest.py       the server: authenticate, check, record in the telemetry store (http.server + ssl)
    reporter.py     the workstation's side: bounded queue, background sender, retries (urllib + ssl)

It lives in ``cmdfed``, not in a role, because the server (``server/telemetry.py``) and the
edge (``edge/reports.py``) both need it and roles never import each other; so it uses the
standard library only (no gRPC in the core). ``import cmdfed.telemetry`` does not load it.
"""
