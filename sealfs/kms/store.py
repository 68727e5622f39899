"""The KMS state store: the sealed root key, app policies and epochs, in SQLite or PostgreSQL.

One logic (this module) over two backends (:class:`StateBackend`): an embedded SQLite file
for one machine (:class:`SqliteBackend`), and a PostgreSQL database that several
``kms serve`` replicas share (:mod:`sealfs.kms.postgres`). The backends only open
transactions; every check below is the same for both.

* The root key is stored only sealed: AES-256-GCM under a key stretched (argon2id) from the
  operator secret, with the format version and the KDF parameters bound into the associated
  data.
* Every policy and epoch row carries a MAC under a root-derived key (:class:`StoreMac`), so
  someone who can write the file but lacks the operator secret cannot edit a row.
* A row MAC alone cannot tell an *old* valid row from the current one, so rows are grouped
  into 256 keyed buckets per table; each bucket's digest commits to exactly the set of row
  MACs in it, and one MAC (the *head*) binds a monotonic table version to every bucket
  digest. Every write bumps the version and re-seals the head in the same transaction; every
  read checks the head and the digest of the bucket it reads (a replayed, added or deleted
  row fails), and :meth:`KmsStore.verify` checks everything at startup. The store remembers
  the highest version it has seen, so a rollback of the whole file while the KMS runs is
  caught too; one made while it is stopped needs an outside record of the version (see
  docs/kms-protocol.md §2).
* Every access is one transaction: reads see one consistent snapshot, and every write
  holds the one writer lock of the state (SQLite ``BEGIN IMMEDIATE``; PostgreSQL a
  self-conflicting lock on ``meta``) from its first read to its commit, so
  compare-and-advance is atomic even with several processes or replicas on one state, and an
  accepted advance is durable before it is answered (losing one would re-open the rollback
  window).
* An optional :class:`~sealfs.kms.highwater.HighWater` file keeps the highest version this
  KMS has served outside the database, so a database restored from an older copy while the
  KMS was stopped is refused at the next start (docs/kms-protocol.md §2).

Every call runs on its own connection (SQLite) or one taken from a small pool (PostgreSQL),
which keeps the store safe to use from worker threads without sharing a connection.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from sealfs import strict
from sealfs.crypto import (
    AuthError,
    KdfParams,
    Secret,
    ct_equal,
    derive_from_passphrase,
    label,
    unwrap_key,
    wrap_key,
)
from sealfs.errors import IntegrityError, KmsError, UnlockError, UsageError
from sealfs.kms.derivation import StoreMac
from sealfs.kms.policy import AppPolicy

if TYPE_CHECKING:
    from sealfs.kms.highwater import HighWater

log = logging.getLogger("sealfs.kms")

FORMAT_VERSION = 2
BUCKETS = 256
#: The MACed tables and their key columns.
TABLES = {"policies": ("app_id",), "epochs": ("app_id", "volume_id")}
#: Written for SQLite; a backend translates the column types it spells otherwise.
_SCHEMA = [
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE policies (app_id BLOB PRIMARY KEY, body BLOB NOT NULL, mac BLOB NOT NULL, "
    "bucket INTEGER NOT NULL DEFAULT -1)",
    "CREATE TABLE epochs (app_id BLOB NOT NULL, volume_id BLOB NOT NULL, "
    "epoch INTEGER NOT NULL, root_digest BLOB NOT NULL, updated_at INTEGER NOT NULL, "
    "mac BLOB NOT NULL, bucket INTEGER NOT NULL DEFAULT -1, PRIMARY KEY (app_id, volume_id))",
]
#: What format 2 adds to format 1 (also run by the migration).
_SCHEMA_V2 = [
    "CREATE TABLE buckets (tbl TEXT NOT NULL, bucket INTEGER NOT NULL, digest BLOB NOT NULL, "
    "PRIMARY KEY (tbl, bucket))",
    "CREATE INDEX policies_bucket ON policies (bucket)",
    "CREATE INDEX epochs_bucket ON epochs (bucket)",
]
_V1_COLUMNS = [
    "ALTER TABLE policies ADD COLUMN bucket INTEGER NOT NULL DEFAULT -1",
    "ALTER TABLE epochs ADD COLUMN bucket INTEGER NOT NULL DEFAULT -1",
]


class StateRolledBack(IntegrityError):
    """The state is older than a version this KMS already served: nothing is answered."""


class Rows(Protocol):
    """What a statement returns (a DB-API cursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Transaction(Protocol):
    """One open transaction; statements use ``?`` placeholders (a backend may rewrite them)."""

    def execute(self, sql: str, params: Any = (), /) -> Rows: ...
    def executemany(self, sql: str, rows: Iterable[Any], /) -> Any: ...


class StateBackend(Protocol):
    """Where the state lives. Backends only open transactions; :class:`KmsStore` does the rest.

    ``transaction(write=True)`` must hold the one writer lock of the state from its first
    statement to its commit (writes never interleave), and return only once the commit is
    durable; ``transaction()`` reads one consistent snapshot.
    """

    location: str

    def check(self) -> None:
        """Raise UsageError if the state does not exist (or cannot be reached)."""

    def transaction(self, write: bool = False) -> AbstractContextManager[Transaction]: ...
    def create(self, schema: Sequence[str]) -> AbstractContextManager[Transaction]: ...


class SqliteBackend:
    """One SQLite file (WAL, ``synchronous=FULL``): the embedded store for one machine."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    def check(self) -> None:
        if not self.path.is_file():
            raise UsageError(
                f"KMS state file {self.path} does not exist (create it with 'sealfs kms init')"
            )
        if self.path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("KMS state file %s is accessible by group/others; chmod 600 it", self.path)

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Transaction]:
        """``BEGIN IMMEDIATE`` to write, ``BEGIN`` (one snapshot) to read."""
        try:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=rw", uri=True, timeout=10, isolation_level=None
            )
        except sqlite3.Error as e:
            raise KmsError(f"cannot open KMS state file: {e}") from None
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise KmsError(f"KMS state store error: {e}") from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    @contextmanager
    def create(self, schema: Sequence[str]) -> Iterator[Transaction]:
        """A new file (refusing to replace one) with ``schema``, in one transaction."""
        p = self.path
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(f"{p} already exists; refusing to replace a KMS root key") from None
        except OSError as e:
            raise UsageError(f"cannot create {p}: {e.strerror}") from None
        os.close(fd)
        try:
            conn = sqlite3.connect(p, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN")
                for statement in schema:
                    conn.execute(statement)
                yield conn
                conn.execute("COMMIT")
            finally:
                conn.close()
        except BaseException:
            p.unlink(missing_ok=True)
            raise


def open_backend(location: str | os.PathLike[str]) -> StateBackend:
    """The backend a ``--state`` value names: a ``postgresql://`` URL or a SQLite file path."""
    text = os.fspath(location)
    if text.startswith(("postgresql://", "postgres://")):
        from sealfs.kms.postgres import PostgresBackend

        return PostgresBackend(text)
    return SqliteBackend(Path(text))


def _upsert(table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
    """``INSERT ... ON CONFLICT DO UPDATE``: the replace-a-row statement both backends speak."""
    sets = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}"
    )


_UPSERT_META = _upsert("meta", ("name", "value"), ("name",))
_UPSERT_BUCKET = _upsert("buckets", ("tbl", "bucket", "digest"), ("tbl", "bucket"))
_UPSERT_POLICY = _upsert("policies", ("app_id", "body", "mac", "bucket"), ("app_id",))
_UPSERT_EPOCH = _upsert(
    "epochs",
    ("app_id", "volume_id", "epoch", "root_digest", "updated_at", "mac", "bucket"),
    ("app_id", "volume_id"),
)


class EpochConflict(KmsError):
    """An epoch advance that would roll a volume back or fork it; refused."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "rollback" or "fork"


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    root_digest: bytes
    updated_at: int


@dataclass(frozen=True)
class StateSummary:
    """What :meth:`KmsStore.verify` found: the table version and the row counts."""

    version: int
    policies: int
    epochs: int


def _root_ad(format_version: int, kdf_json: bytes) -> bytes:
    return label("kms-root-seal", format_version, kdf_json)


class _Snapshot:
    """One transaction's view of the state, with the head checked; tracks touched buckets.

    ``floor`` is the highest version this process had seen before the transaction began: a
    lower version means the file went back in time under the running KMS.
    """

    def __init__(self, conn: Transaction, macs: StoreMac, floor: int) -> None:
        self.conn, self.macs = conn, macs
        self.version, self.digests = _read_head(conn, macs)
        if self.version < floor:
            log.error(
                "KMS state: table version went back from %d to %d (state rolled back?)",
                floor,
                self.version,
            )
            raise StateRolledBack(
                f"KMS state: table version went back from {floor} to "
                f"{self.version} (the state was rolled back)"
            )
        self._touched: set[tuple[str, int]] = set()

    def checked_bucket(self, table: str, *key: bytes) -> int:
        """The bucket of ``key``, after checking its rows are exactly the committed ones."""
        bucket = self.macs.bucket_of(table, *key)
        if not ct_equal(
            _bucket_digest(self.conn, self.macs, table, bucket), self.digests[table, bucket]
        ):
            _rows_replayed(f"{table} bucket {bucket}")
        return bucket

    def check_all(self) -> None:
        """Check every bucket of every table against the head."""
        found = _all_digests(self.conn, self.macs)
        for (table, bucket), digest in self.digests.items():
            if not ct_equal(found[table, bucket], digest):
                _rows_replayed(f"{table} bucket {bucket}")

    def touched(self, table: str, bucket: int) -> None:
        self._touched.add((table, bucket))

    def seal(self) -> None:
        """Re-digest the touched buckets and write the head at the next version."""
        if not self._touched:
            return
        for table, bucket in self._touched:
            self.digests[table, bucket] = _bucket_digest(self.conn, self.macs, table, bucket)
        _write_head(self.conn, self.macs, self.version + 1, self.digests, self._touched)
        self.version += 1


def _rows_replayed(where: str) -> NoReturn:
    log.error(
        "KMS state: %s does not match the table head (a row was replayed, added or "
        "removed outside the KMS)",
        where,
    )
    raise IntegrityError(
        "KMS state: the rows do not match the table head (a row was "
        "replayed, added or removed outside the KMS)"
    )


def _bucket_digest(conn: Transaction, macs: StoreMac, table: str, bucket: int) -> bytes:
    rows = conn.execute(f"SELECT mac FROM {table} WHERE bucket = ?", (bucket,)).fetchall()
    return macs.bucket(table, bucket, (_blob(m) for (m,) in rows))


def _all_digests(conn: Transaction, macs: StoreMac) -> dict[tuple[str, int], bytes]:
    """Every bucket digest, computed from the rows (a row in no valid bucket changes none,
    so it is caught by its own bucket check in :meth:`KmsStore.verify`)."""
    digests = {}
    for table in TABLES:
        groups: dict[int, list[bytes]] = collections.defaultdict(list)
        for bucket, tag in conn.execute(f"SELECT bucket, mac FROM {table}").fetchall():
            groups[bucket].append(_blob(tag))
        for bucket in range(BUCKETS):
            digests[table, bucket] = macs.bucket(table, bucket, groups.get(bucket, []))
    return digests


def _ordered(digests: dict[tuple[str, int], bytes]) -> list[bytes]:
    return [digests[table, bucket] for table in TABLES for bucket in range(BUCKETS)]


def _read_head(conn: Transaction, macs: StoreMac) -> tuple[int, dict[tuple[str, int], bytes]]:
    """The table version and bucket digests, after checking the head MAC over them."""
    meta = dict(
        conn.execute(
            "SELECT name, value FROM meta WHERE name IN ('state_version', 'state_mac')"
        ).fetchall()
    )
    digests = {
        (t, b): d for t, b, d in conn.execute("SELECT tbl, bucket, digest FROM buckets").fetchall()
    }
    try:
        version = int(meta["state_version"])
        tag = _blob(meta["state_mac"])
        ordered = [_blob(d) for d in _ordered(digests)]
    except (KeyError, ValueError, TypeError, IntegrityError):
        raise IntegrityError("KMS state: the table head is missing or malformed") from None
    if len(digests) != len(ordered) or not ct_equal(macs.head(version, ordered), tag):
        log.error("KMS state: the table head fails its MAC (tampered state file?)")
        raise IntegrityError("KMS state: the table head fails its MAC")
    return version, dict(
        zip(((t, b) for t in TABLES for b in range(BUCKETS)), ordered, strict=True)
    )


def _write_head(
    conn: Transaction,
    macs: StoreMac,
    version: int,
    digests: dict[tuple[str, int], bytes],
    changed: set[tuple[str, int]],
) -> None:
    conn.executemany(_UPSERT_BUCKET, [(t, b, digests[t, b]) for t, b in sorted(changed)])
    conn.executemany(
        _UPSERT_META,
        [
            ("state_version", str(version).encode()),
            ("state_mac", macs.head(version, _ordered(digests))),
        ],
    )


class KmsStore:
    """Access to one KMS state. Construct with an existing one (a SQLite path or a
    ``postgresql://`` URL); :meth:`initialize` makes one."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self.backend = open_backend(location)
        self.backend.check()
        self._seen_version = 0  # the highest table version this process has seen
        self._seen_lock = threading.Lock()
        self._high_water: HighWater | None = None

    @property
    def location(self) -> str:
        """Where the state is, for messages (a URL without its password)."""
        return self.backend.location

    def __repr__(self) -> str:
        return f"<KmsStore {self.location}>"

    def remember_in(self, record: HighWater) -> None:
        """Keep the highest version served in ``record`` too, and refuse any state older
        than what it already holds (checked by the next access: run :meth:`verify`)."""
        with self._seen_lock:
            self._high_water = record
            self._seen_version = max(self._seen_version, record.load())

    @contextmanager
    def _snapshot(self, macs: StoreMac, write: bool = False) -> Iterator[_Snapshot]:
        """A transaction whose head is checked; a write re-seals the head before commit.

        The version is recorded (in memory, and in the high-water file) after the commit and
        before the caller answers anyone, so no answer ever rests on a version not recorded.
        """
        floor = self._seen_version  # read before the snapshot starts: see _Snapshot
        with self.backend.transaction(write) as conn:
            snap = _Snapshot(conn, macs, floor)
            yield snap
            snap.seal()
        self.saw(snap.version)

    @property
    def seen_version(self) -> int:
        """The highest table version this store has seen (its floor)."""
        return self._seen_version

    def saw(self, version: int) -> None:
        """Raise the floor to ``version`` (seen here, or served by a peer replica), and
        record it in the high-water file: a state older than it is refused from now on."""
        with self._seen_lock:
            if version > self._seen_version:
                self._seen_version = version
                if self._high_water is not None:
                    self._high_water.store(version)

    # --- creation, unlock, migration, verification -------------------------------------------

    @classmethod
    def initialize(
        cls,
        location: str | os.PathLike[str],
        operator_secret: Secret,
        kdf: KdfParams | None = None,
    ) -> tuple[KmsStore, Secret]:
        """Create a new state with a fresh random root key; refuse to overwrite one.

        Returns the store and the (unsealed) root key.
        """
        kdf = kdf or KdfParams.default()
        kdf_json = json.dumps(kdf.to_dict(), sort_keys=True).encode()
        root = Secret.generate()
        sealed = wrap_key(
            derive_from_passphrase(operator_secret, kdf), root, _root_ad(FORMAT_VERSION, kdf_json)
        )
        with open_backend(location).create(_SCHEMA + _SCHEMA_V2) as conn:
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("format", str(FORMAT_VERSION).encode()),
                    ("kdf", kdf_json),
                    ("sealed_root", sealed),
                    ("created_at", str(int(time.time())).encode()),
                ],
            )
            _seal_all(conn, StoreMac(root), version=1)
        return cls(location), root

    def unlock(self, operator_secret: Secret) -> Secret:
        """The root key, unsealed with the operator secret; a format 1 file is migrated."""
        with self.backend.transaction() as conn:
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        try:
            version = int(meta["format"])
            kdf_json = _blob(meta["kdf"])
            kdf = KdfParams.from_dict(strict.loads(kdf_json))
            sealed = _blob(meta["sealed_root"])
        except (KeyError, ValueError, TypeError, IntegrityError):
            version = 0
        if version not in (1, FORMAT_VERSION):
            raise KmsError("KMS state file is not a sealfs KMS state of a known version")
        kek = derive_from_passphrase(operator_secret, kdf)
        try:
            root = unwrap_key(kek, sealed, _root_ad(version, kdf_json))
        except AuthError:
            if version == 1 and _opens(kek, sealed, _root_ad(FORMAT_VERSION, kdf_json)):
                raise IntegrityError(
                    "KMS state file claims format 1 but was written as "
                    f"format {FORMAT_VERSION} (downgrade refused)"
                ) from None
            raise UnlockError("wrong operator secret for this KMS state file") from None
        if version == 1:
            self._migrate_v1(kek, root, kdf_json)
        return root

    def _migrate_v1(self, kek: Secret, root: Secret, kdf_json: bytes) -> None:
        """Format 1 → 2: check every row's MAC, bucket the rows, seal the head, and re-seal
        the root for format 2, so the file cannot be passed off as format 1 (no head) again.

        Trusts the rows as they are now: a row replayed *before* the migration stays.
        """
        macs = StoreMac(root)
        with self.backend.transaction(write=True) as conn:
            fmt = conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
            if int(fmt[0]) != 1:
                return  # another process migrated it meanwhile
            for statement in _V1_COLUMNS + _SCHEMA_V2:
                conn.execute(statement)
            for app_id, body, tag in conn.execute("SELECT app_id, body, mac FROM policies"):
                self._load_policy(macs, _blob(app_id), body, tag)
            conn.executemany(
                "UPDATE policies SET bucket = ? WHERE app_id = ?",
                [
                    (macs.bucket_of("policies", _blob(a)), a)
                    for (a,) in conn.execute("SELECT app_id FROM policies").fetchall()
                ],
            )
            rows = conn.execute("SELECT app_id, volume_id FROM epochs").fetchall()
            for app_id, volume_id in rows:
                self._read_epoch(conn, macs, _blob(app_id), _blob(volume_id))
            conn.executemany(
                "UPDATE epochs SET bucket = ? WHERE app_id = ? AND volume_id = ?",
                [(macs.bucket_of("epochs", _blob(a), _blob(v)), a, v) for a, v in rows],
            )
            _seal_all(conn, macs, version=1)
            conn.executemany(
                "UPDATE meta SET value = ? WHERE name = ?",
                [
                    (str(FORMAT_VERSION).encode(), "format"),
                    (wrap_key(kek, root, _root_ad(FORMAT_VERSION, kdf_json)), "sealed_root"),
                ],
            )
        log.warning(
            "migrated KMS state file %s from format 1 to format %d", self.location, FORMAT_VERSION
        )

    def verify(self, macs: StoreMac) -> StateSummary:
        """Check the whole state: the head, every bucket digest, every row's MAC and bucket.

        Run at startup, so a replayed or removed row is refused before anything is served.
        """
        with self._snapshot(macs) as snap:
            snap.check_all()
            policies = self._policy_rows(
                snap, snap.conn.execute("SELECT app_id, body, mac, bucket FROM policies").fetchall()
            )
            epochs = snap.conn.execute("SELECT app_id, volume_id, bucket FROM epochs").fetchall()
            for app_id, volume_id, bucket in epochs:
                key = (_blob(app_id), _blob(volume_id))
                _check_bucket_column(macs.bucket_of("epochs", *key), bucket)
                self._read_epoch(snap.conn, macs, *key)
        return StateSummary(snap.version, len(policies), len(epochs))

    # --- policies ----------------------------------------------------------------------------

    def put_policy(self, macs: StoreMac, policy: AppPolicy) -> None:
        body = policy.canonical()
        with self._snapshot(macs, write=True) as snap:
            bucket = snap.checked_bucket("policies", policy.app_id)
            snap.conn.execute(
                _UPSERT_POLICY,
                (policy.app_id, body, macs.policy(policy.app_id, body), bucket),
            )
            snap.touched("policies", bucket)

    def get_policy(self, macs: StoreMac, app_id: bytes) -> AppPolicy | None:
        with self._snapshot(macs) as snap:
            return self._policy_in(snap, app_id)

    def list_policies(self, macs: StoreMac) -> list[AppPolicy]:
        with self._snapshot(macs) as snap:
            snap.check_all()
            return self._policy_rows(
                snap,
                snap.conn.execute(
                    "SELECT app_id, body, mac, bucket FROM policies ORDER BY app_id"
                ).fetchall(),
            )

    def delete_policy(self, macs: StoreMac, app_id: bytes) -> bool:
        with self._snapshot(macs, write=True) as snap:
            bucket = snap.checked_bucket("policies", app_id)
            gone = (
                snap.conn.execute("DELETE FROM policies WHERE app_id = ?", (app_id,)).rowcount > 0
            )
            snap.touched("policies", bucket)
            return gone

    def rotate_policy(self, macs: StoreMac, app_id: bytes) -> AppPolicy:
        """Bump an app's current key version (old versions stay derivable)."""
        return self._update_policy(macs, app_id, lambda old: old.with_version(old.key_version + 1))

    def retire_version(self, macs: StoreMac, app_id: bytes, version: int) -> AppPolicy:
        """Stop releasing key ``version`` of an app (see :meth:`AppPolicy.retire`)."""
        return self._update_policy(macs, app_id, lambda old: old.retire(version))

    def _update_policy(
        self, macs: StoreMac, app_id: bytes, change: Callable[[AppPolicy], AppPolicy]
    ) -> AppPolicy:
        """Replace an app's policy by ``change(policy)`` in one transaction, so two
        administrators changing key versions at once never lose one of the changes."""
        with self._snapshot(macs, write=True) as snap:
            old = self._policy_in(snap, app_id)
            if old is None:
                raise UsageError(f"no policy for app id {app_id.hex()}")
            new = change(old)
            body = new.canonical()
            snap.conn.execute(
                "UPDATE policies SET body = ?, mac = ? WHERE app_id = ?",
                (body, macs.policy(app_id, body), app_id),
            )
            snap.touched("policies", macs.bucket_of("policies", app_id))
        return new

    def _policy_in(self, snap: _Snapshot, app_id: bytes) -> AppPolicy | None:
        bucket = snap.checked_bucket("policies", app_id)
        row = snap.conn.execute(
            "SELECT app_id, body, mac, bucket FROM policies WHERE app_id = ?", (app_id,)
        ).fetchone()
        if row is None:
            return None
        _check_bucket_column(bucket, row[3])
        return self._load_policy(snap.macs, app_id, row[1], row[2])

    def _policy_rows(self, snap: _Snapshot, rows: list[tuple[object, ...]]) -> list[AppPolicy]:
        policies = []
        for app_id, body, tag, bucket in rows:
            key = _blob(app_id)
            _check_bucket_column(snap.macs.bucket_of("policies", key), bucket)
            policies.append(self._load_policy(snap.macs, key, body, tag))
        return policies

    @staticmethod
    def _load_policy(macs: StoreMac, app_id: bytes, body: object, tag: object) -> AppPolicy:
        body, tag = _blob(body), _blob(tag)
        if not ct_equal(macs.policy(app_id, body), tag):
            log.error(
                "KMS state: policy row for app %s fails its MAC (tampered state file?)",
                app_id.hex(),
            )
            raise IntegrityError(f"KMS state: policy for app {app_id.hex()} fails its MAC")
        policy = AppPolicy.from_dict(strict.loads(body))
        if policy.app_id != app_id:
            raise IntegrityError(f"KMS state: policy row for app {app_id.hex()} is misplaced")
        return policy

    # --- epochs ------------------------------------------------------------------------------

    def get_epoch(self, macs: StoreMac, app_id: bytes, volume_id: bytes) -> EpochRecord | None:
        with self._snapshot(macs) as snap:
            snap.checked_bucket("epochs", app_id, volume_id)
            return self._read_epoch(snap.conn, macs, app_id, volume_id)

    def advance_epoch(
        self, macs: StoreMac, app_id: bytes, volume_id: bytes, epoch: int, root_digest: bytes
    ) -> EpochRecord:
        """Atomically accept ``epoch`` if it moves forward (or repeats the same state).

        Same epoch and digest: idempotent, nothing changes. Same epoch, other digest: a fork
        (two diverging histories); lower epoch: a rollback. Both raise EpochConflict.
        """
        with self._snapshot(macs, write=True) as snap:
            bucket = snap.checked_bucket("epochs", app_id, volume_id)
            current = self._read_epoch(snap.conn, macs, app_id, volume_id)
            if current is not None:
                if epoch < current.epoch:
                    raise EpochConflict(
                        "rollback",
                        f"epoch {epoch} is older than the KMS epoch "
                        "for this volume (rollback refused)",
                    )
                if epoch == current.epoch:
                    if ct_equal(root_digest, current.root_digest):
                        return current
                    raise EpochConflict(
                        "fork",
                        f"epoch {epoch} already anchored with a "
                        "different root digest (fork refused)",
                    )
            now = int(time.time())
            snap.conn.execute(
                _UPSERT_EPOCH,
                (
                    app_id,
                    volume_id,
                    epoch,
                    root_digest,
                    now,
                    macs.epoch(app_id, volume_id, epoch, root_digest),
                    bucket,
                ),
            )
            snap.touched("epochs", bucket)
            return EpochRecord(epoch, root_digest, now)

    @staticmethod
    def _read_epoch(
        conn: Transaction, macs: StoreMac, app_id: bytes, volume_id: bytes
    ) -> EpochRecord | None:
        row = conn.execute(
            "SELECT epoch, root_digest, updated_at, mac FROM epochs "
            "WHERE app_id = ? AND volume_id = ?",
            (app_id, volume_id),
        ).fetchone()
        if row is None:
            return None
        if not isinstance(row[0], int) or not isinstance(row[2], int):
            raise IntegrityError("KMS state: an epoch record is malformed")
        epoch, digest, updated, tag = row[0], _blob(row[1]), row[2], _blob(row[3])
        if not ct_equal(macs.epoch(app_id, volume_id, epoch, digest), tag):
            log.error(
                "KMS state: epoch row for app %s volume %s fails its MAC (tampered state file?)",
                app_id.hex(),
                volume_id.hex(),
            )
            raise IntegrityError("KMS state: an epoch record fails its MAC")
        return EpochRecord(epoch, digest, updated)


def _seal_all(conn: Transaction, macs: StoreMac, version: int) -> None:
    """Digest every bucket from the rows and write the head (creation and migration)."""
    digests = _all_digests(conn, macs)
    _write_head(conn, macs, version, digests, set(digests))


def _check_bucket_column(expected: int, stored: object) -> None:
    """A row filed under another bucket than its key's would escape that bucket's check."""
    if stored != expected:
        raise IntegrityError("KMS state: a row is filed in the wrong bucket")


def _opens(kek: Secret, sealed: bytes, ad: bytes) -> bool:
    try:
        unwrap_key(kek, sealed, ad)
    except AuthError:
        return False
    return True


def _blob(value: object) -> bytes:
    """A BLOB column's value; anything else (an edited row's TEXT, INTEGER) fails its MAC."""
    if isinstance(value, bytes | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise IntegrityError("KMS state: a row holds a value of the wrong type")
