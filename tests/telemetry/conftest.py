"""Fixtures: a SQLite path, and a PostgreSQL database when one can be had.

PostgreSQL comes from ``CMDFED_TEST_POSTGRES_URL`` when set (each test then works in a
throwaway schema of that database), or else from a throwaway cluster started from the server
binaries under /usr/lib/postgresql/*/bin (Debian/Ubuntu ``postgresql`` package), listening on a
unix socket only. Without either, PostgreSQL tests are skipped and say why.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_URL_ENV = "CMDFED_TEST_POSTGRES_URL"


def _pg_bin_dir() -> Path | None:
    def major(path: str) -> int:
        m = re.search(r"/postgresql/(\d+)/", path)
        return int(m.group(1)) if m else 0

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for d in candidates:
        if os.access(Path(d, "initdb"), os.X_OK) and os.access(Path(d, "pg_ctl"), os.X_OK):
            return Path(d)
    return None


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd="/")


@pytest.fixture(scope="session")
def postgres_server_url():
    """A PostgreSQL URL (psycopg 3 driver) for the session, or skip."""
    env_url = os.environ.get(PG_URL_ENV)
    if env_url:
        url = sa.engine.make_url(env_url)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        yield url.render_as_string(hide_password=False)
        return

    bindir = _pg_bin_dir()
    if bindir is None:
        pytest.skip(
            f"no PostgreSQL: set {PG_URL_ENV} or install the server "
            "(apt-get install postgresql puts initdb/pg_ctl under /usr/lib/postgresql/*/bin)"
        )
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run initdb as")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and there is no runuser to start PostgreSQL as 'postgres'")
        run_as = [runuser, "-u", "postgres", "--"]

    # Short path under /tmp: the socket lives here (unix socket paths are limited to ~100
    # bytes), and pytest's own tmp folder is private to root, so 'postgres' could not enter it.
    base = Path(tempfile.mkdtemp(prefix="cmdfed-pg-"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, log = base / "data", base / "server.log"
    pg_ctl = str(bindir / "pg_ctl")
    started = False
    try:
        init = _run(
            run_as
            + [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            timeout=120,
        )
        if init.returncode != 0:
            pytest.fail(f"initdb failed:\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")
        start = _run(
            run_as
            + [
                pg_ctl,
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "-o",
                f"-k {base} -h '' -F",
                "start",
            ],
            timeout=90,
        )
        started = start.returncode == 0
        if not started:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n{tail}")
        yield f"postgresql+psycopg://postgres@/postgres?host={base}"
    finally:
        if started or data.exists():
            try:
                _run(
                    run_as + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"],
                    timeout=60,
                )
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server_url):
    """A URL whose connections work in a fresh schema of their own, dropped afterwards."""
    schema = f"cmdfed_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server_url)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = sa.engine.make_url(postgres_server_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    """Where a new store goes: a SQLite file path, or a PostgreSQL URL (skipped if none)."""
    if request.param == "sqlite":
        return str(tmp_path / "telemetry.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def raw_engine():
    """Make plain SQLAlchemy engines on a store's database, to poke at it behind its back."""
    engines: list[sa.Engine] = []

    def make(url_or_path: str) -> sa.Engine:
        url = url_or_path if "://" in url_or_path else f"sqlite:///{url_or_path}"
        engines.append(sa.create_engine(url))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()
