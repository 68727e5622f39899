"""A throwaway PostgreSQL 15 cluster: ``initdb`` + ``pg_ctl`` as the ``postgres`` user in a
temporary directory it owns, listening only on a Unix socket in that directory (no TCP port,
trust authentication for that socket alone). The KMS tests and ``tools/bench-kms
--postgres-temp`` both run on it.

The tests run it with ``fsync=off`` (they check what the KMS does with the database's answers:
locks, snapshots, restores; not PostgreSQL's crash durability, and the machine is shared);
the benchmark with ``fsync=on``, so an anchor advance is as durable as on SQLite
(``synchronous=FULL``) and the figures compare.
Needs root (``runuser``) and the Debian packages postgresql-15 and postgresql-client-15.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from .system import cpu_seconds

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def missing() -> str | None:
    """Why a temporary cluster cannot run here, or None."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing; run make test)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' user (the postgresql-15 package creates it)"
    if os.geteuid() != 0:
        return "starting a temporary PostgreSQL as the 'postgres' user needs root"
    return None


class TempPostgres:
    """One cluster in a fresh temporary directory, started on entry, stopped and removed on
    exit; each user takes its own database (:meth:`new_database`)."""

    def __init__(self, max_connections: int = 200, fsync: bool = False) -> None:
        self.max_connections = max_connections
        self.fsync = fsync
        self.home = Path(tempfile.mkdtemp(prefix="sealfs-pg-"))

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

    def cpu_s(self) -> float:
        """CPU seconds the whole cluster has used: the postmaster, its live children (one
        backend per client connection, the WAL writer...) and the children it has reaped."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        total = cpu_seconds(postmaster)
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(name) == postmaster:
                total += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
            elif int(fields[1]) == postmaster:
                total += cpu_seconds(int(name))
        return total

    def __enter__(self) -> TempPostgres:
        user = pwd.getpwnam("postgres")
        os.chown(self.home, user.pw_uid, user.pw_gid)
        try:
            self.as_postgres(
                str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                *([] if self.fsync else ["--no-sync"]),
            )  # fmt: skip
            options = (
                f"-k {self.home} -c listen_addresses='' -c fsync={'on' if self.fsync else 'off'}"
            )
            self.as_postgres(
                str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.home / "postgres.log"),
                "-w", "-o", f"{options} -c max_connections={self.max_connections}", "start",
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(self.home, ignore_errors=True)
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.as_postgres(
                str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
            )
        finally:
            shutil.rmtree(self.home, ignore_errors=True)
