"""A real PostgreSQL 15 for the KMS tests: ``initdb`` + ``pg_ctl`` as the ``postgres`` user in
a temporary directory it owns, listening only on a Unix socket in that directory.

``make test`` installs the Debian packages (postgresql-15, postgresql-client-15); the tests
skip, saying why, only when they are missing. ``fsync=off``: these tests check what the KMS
does with the database's answers (locks, snapshots, restores), not PostgreSQL's own crash
durability, and the machine is shared.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import KmsProcess, KmsState, make_state, start_kms

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _missing() -> str | None:
    """Why PostgreSQL cannot run here, or None."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing; run make test)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' user (the postgresql-15 package creates it)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e .)"
    return None


@dataclass
class PostgresServer:
    """One running cluster; each test takes its own database."""

    home: Path

    @property
    def data(self) -> Path:
        return self.home / "data"

    def url(self, db: str) -> str:
        return f"postgresql://postgres@/{db}?host={self.home}"

    def as_postgres(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )

    def tool(self, name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        return self.as_postgres(str(PG_BIN / name), "-h", str(self.home), "-U", "postgres", *args)

    def new_database(self, name: str) -> str:
        self.tool("createdb", name)
        return self.url(name)

    def dump(self, db: str, dest: Path) -> None:
        """A custom-format ``pg_dump`` of ``db`` (what a nightly backup would be)."""
        dest.write_bytes(self.tool("pg_dump", "-Fc", db).stdout)

    def restore(self, db: str, dump: Path) -> None:
        """Put ``db`` back to ``dump`` (``pg_restore --clean``), as an operator restoring a
        backup would."""
        readable = self.home / "restore.dump"
        shutil.copyfile(dump, readable)
        os.chown(readable, pwd.getpwnam("postgres").pw_uid, -1)
        self.tool(
            "pg_restore", "--clean", "--if-exists", "--single-transaction", "-d", db, str(readable)
        )


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    home = Path(tempfile.mkdtemp(prefix="sealfs-pg-"))
    os.chown(home, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
    server = PostgresServer(home)
    log = home / "postgres.log"
    server.as_postgres(
        str(PG_BIN / "initdb"),
        "-D",
        str(server.data),
        "-A",
        "trust",
        "-U",
        "postgres",
        "--no-sync",
    )
    server.as_postgres(
        str(PG_BIN / "pg_ctl"),
        "-D",
        str(server.data),
        "-l",
        str(log),
        "-w",
        "-o",
        f"-k {home} -c listen_addresses='' -c fsync=off -c max_connections=200",
        "start",
    )
    try:
        yield server
    finally:
        server.as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "-w", "stop"
        )
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def pg_state(postgres: PostgresServer, tmp_path: Path, request: pytest.FixtureRequest) -> KmsState:
    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "")[:40]
    return make_state(tmp_path, postgres.new_database(name))


def replica(state: KmsState, name: str) -> KmsProcess:
    return start_kms(
        state,
        "--allow-simulated",
        "--high-water",
        str(state.path.parent / f"{name}.high-water"),
        log_name=f"{name}.log",
    )
