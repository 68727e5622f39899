"""The KMS state in PostgreSQL, shared by several ``kms serve`` replicas (psycopg 3).

Only transactions live here; the checks are :class:`sealfs.kms.store.KmsStore`'s, the same as
for SQLite. What makes replicas agree:

* a write transaction first takes ``LOCK TABLE meta IN SHARE ROW EXCLUSIVE MODE``, a lock
  that conflicts with itself and not with plain reads. Every write (any replica) therefore
  runs alone from its first read of the head to its commit, and under READ COMMITTED each
  statement after the lock sees every write committed before it: an epoch advance is a
  compare-and-set, and of two replicas racing to advance one volume the second sees the
  first's epoch and refuses a fork;
* a read is one ``REPEATABLE READ READ ONLY`` snapshot, so the head and the rows it checks
  are of one moment;
* ``synchronous_commit`` is forced ``on`` for writes: an accepted advance is durable on the
  primary (and, with ``synchronous_standby_names`` set on the server, on a standby) before it
  is answered.

Connections are kept in a small pool because opening one costs a server process; a
connection that saw a database error is closed, not reused, and a lost connection to the
server empties the pool.
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from sealfs.errors import KmsError, UsageError

log = logging.getLogger("sealfs.kms")

POOL_SIZE = 16
CONNECT_TIMEOUT_S = 10
_TYPES = {"BLOB": "BYTEA", "INTEGER": "BIGINT"}


_PASSWORD = re.compile(r"(://[^/@:]*:)([^/@]*)(@)|([?&]password=)([^&]*)()")


def redact(url: str) -> str:
    """``url`` without its password (in the user part or a ``password=`` parameter), for
    messages and logs."""
    return _PASSWORD.sub(lambda m: f"{m[1] or m[4]}***{m[3] or m[6]}", url)


def _passwords(url: str) -> list[str]:
    """The passwords ``url`` holds, longest first: libpq quotes a malformed URL (or a bad
    token of it) in its error, so they are struck from every message too."""
    found = {m[2] or m[5] for m in _PASSWORD.finditer(url)}
    found = (found | {urllib.parse.unquote(p) for p in found}) - {""}
    return sorted(found, key=len, reverse=True)


class _Tx:
    """A transaction speaking the store's ``?`` placeholders (psycopg uses ``%s``)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = (), /) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params, binary=True)

    def executemany(self, sql: str, rows: Iterable[Any], /) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)


class PostgresBackend:
    """A ``postgresql://`` URL (libpq syntax; put the password in ~/.pgpass or
    PGPASSFILE rather than the URL, which ``ps`` may show to other users)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.location = redact(url)
        self._passwords = _passwords(url)
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<PostgresBackend {self.location}>"

    def check(self) -> None:
        conn = self._connection()
        try:
            found = _exists(conn)
        except psycopg.Error as e:
            conn.close()
            raise KmsError(f"KMS database error: {self._said(e)}") from None
        self._give_back(conn)
        if not found:
            raise UsageError(
                f"database {self.location} holds no KMS state (create it with 'sealfs kms init')"
            )

    def _said(self, e: BaseException) -> str:
        """The first line of a database error, without the URL's password."""
        text = _first_line(e)
        for password in self._passwords:
            text = text.replace(password, "***")
        return text

    def _connection(self) -> psycopg.Connection[Any]:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            return psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as e:
            raise KmsError(
                f"cannot reach the KMS database {self.location}: {self._said(e)}"
            ) from None

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if len(self._idle) < POOL_SIZE:
                self._idle.append(conn)
                return
        conn.close()

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[_Tx]:
        conn = self._connection()
        try:
            if write:
                conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                conn.execute("SET LOCAL synchronous_commit = on")
                conn.execute("LOCK TABLE meta IN SHARE ROW EXCLUSIVE MODE")
            else:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield _Tx(conn)
            conn.execute("COMMIT")
        except psycopg.Error as e:
            conn.close()
            if isinstance(e, psycopg.OperationalError):
                self._drop_idle()  # the server restarted or went away: they are stale too
            raise KmsError(f"KMS database error: {self._said(e)}") from None
        except Exception:
            self._roll_back(conn)  # a refusal (e.g. a fork) ends the transaction, not the link
            raise
        except BaseException:
            conn.close()
            raise
        self._give_back(conn)

    def _roll_back(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            conn.close()
            return
        self._give_back(conn)

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextmanager
    def create(self, schema: Sequence[str]) -> Iterator[_Tx]:
        """The tables of a new state, in one transaction; refuse a database that has them."""
        conn = self._connection()
        try:
            conn.execute("BEGIN")
            if _exists(conn):
                raise UsageError(
                    f"{self.location} already holds a KMS state; refusing to replace a KMS root key"
                )
            for statement in schema:
                conn.execute(re.sub(r"\b(BLOB|INTEGER)\b", lambda m: _TYPES[m[1]], statement))
            yield _Tx(conn)
            conn.execute("COMMIT")
        except psycopg.Error as e:
            raise KmsError(
                f"cannot create the KMS state in {self.location}: {self._said(e)}"
            ) from None
        finally:
            conn.close()


def _exists(conn: psycopg.Connection[Any]) -> bool:
    """Whether the database already has the KMS tables."""
    row = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
    return bool(row and row[0])


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
