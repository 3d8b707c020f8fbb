"""What may leave a hospital about a file: its name, never its folders.

Paths on hospital file systems can carry patient identifiers (``/scans/Smith_J/case7.svs``),
so every text a site or workstation sends out (failure reasons to the federation server,
errors and slide names to the telemetry store) goes through here first.

A path-like token is a run of characters without spaces, quotes or brackets that holds a
``/`` or ``\\``, with an optional drive letter (``C:``). A colon ends a token before its
first separator, so ``error:/data/x.svs`` keeps ``error:``. Each token is cut to its last
part; a token of separators only becomes ``<path>``.
"""

from __future__ import annotations

import re

_PATH_TOKEN = re.compile(r"""(?:\b[A-Za-z]:)?[^\s'"()<>\[\]{},;:]*[\\/][^\s'"()<>\[\]{},;]*""")


def file_name_only(name: str) -> str:
    """The last part of a path (``/a/b/c.svs`` -> ``c.svs``; a trailing separator is ignored)."""
    return re.split(r"[\\/]", name.rstrip("\\/"))[-1]


def redact_paths(text: str) -> str:
    """``text`` with every path-like token cut to its last part (see the module docstring)."""
    return _PATH_TOKEN.sub(lambda m: file_name_only(m.group()) or "<path>", text)
