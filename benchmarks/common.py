"""What every benchmark records beside its numbers: the command, the machine, the versions."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPOSITORY = Path(__file__).resolve().parents[1]


def commit_of(code: Path = REPOSITORY, *paths: str) -> str:
    """The short commit of a checkout, marked "+uncommitted" when its tracked files (or those
    under ``paths``) have changes: the code a result came from; "unknown" outside a git
    checkout (a result is never lost for want of its commit)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(code), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
        return git("rev-parse", "--short", "HEAD") + ("+uncommitted" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def save(name: str, rows: list[dict], notes: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "command": " ".join(["python -m benchmarks." + Path(sys.argv[0]).stem, *map(shlex.quote, sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "notes": notes,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown_table(rows))
    return path


def save_or_print(name: str, rows: list[dict], notes: str, quick: bool) -> None:
    """Save the result (``save``), or with ``--quick`` (a smoke run) only print it."""
    if quick:
        print(markdown_table(rows) + "\n\n" + notes)
    else:
        save(name, rows, notes=notes)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def peak_rss_mb_children() -> float:
    """Peak resident memory of the largest finished child process, in MB (Linux: KiB units)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
