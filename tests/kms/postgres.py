"""A real PostgreSQL 15 for the KMS tests: one temporary cluster per session
(tools/bench_lib/postgres.py, shared with ``tools/bench-kms --postgres-temp``), one database
per test.

``make test`` installs the Debian packages (postgresql-15, postgresql-client-15); the tests
skip, saying why, only when they are missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.bench_lib.postgres import TempPostgres, missing

from .conftest import KmsProcess, KmsState, make_state, start_kms


def _missing() -> str | None:
    """Why PostgreSQL cannot run here, or None."""
    reason = missing()
    if reason is not None:
        return reason
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e .)"
    return None


class PostgresServer(TempPostgres):
    """The session's cluster, with what the restore tests do to a database."""

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
    with PostgresServer() as server:
        yield server


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
