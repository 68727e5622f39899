"""The KMS state store: one SQLite file with the sealed root key, app policies and epochs.

* The root key is stored only sealed: AES-256-GCM under a key stretched (argon2id) from the
  operator secret, with the KDF parameters bound into the associated data.
* Policy and epoch rows carry a MAC under a root-derived key (:class:`StoreMac`), so someone
  who can write the file but lacks the operator secret cannot grant an image access or move a
  volume's epoch backwards row by row. Restoring an *entire* older copy of the file is outside
  what MACs can catch; keep the state file on storage you trust, and back it up.
* Epoch updates run in ``BEGIN IMMEDIATE`` transactions with ``synchronous=FULL``, so
  compare-and-advance is atomic even with several server processes on one file, and an
  accepted advance survives a crash (losing one would re-open the rollback window).

Every call opens its own short-lived connection, which keeps the store safe to use from
worker threads without sharing a connection.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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

log = logging.getLogger("sealfs.kms")

FORMAT_VERSION = 1
_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE policies (app_id BLOB PRIMARY KEY, body BLOB NOT NULL, mac BLOB NOT NULL);
CREATE TABLE epochs (
    app_id BLOB NOT NULL, volume_id BLOB NOT NULL, epoch INTEGER NOT NULL,
    root_digest BLOB NOT NULL, updated_at INTEGER NOT NULL, mac BLOB NOT NULL,
    PRIMARY KEY (app_id, volume_id));
"""


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


def _root_ad(kdf_json: bytes) -> bytes:
    return label("kms-root-seal", FORMAT_VERSION, kdf_json)


class KmsStore:
    """Access to one state file. Construct with an existing path; :meth:`initialize` makes one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"KMS state file {self.path} does not exist "
                             "(create it with 'sealfs kms init')")
        mode = self.path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("KMS state file %s is accessible by group/others; chmod 600 it",
                        self.path)

    def __repr__(self) -> str:
        return f"<KmsStore {self.path}>"

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=10,
                                   isolation_level=None)
        except sqlite3.Error as e:
            raise KmsError(f"cannot open KMS state file: {e}") from None
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=10000")
            if write:
                conn.execute("BEGIN IMMEDIATE")
            yield conn
            if write:
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

    # --- creation and unlock -----------------------------------------------------------------

    @classmethod
    def initialize(cls, path: str | os.PathLike[str], operator_secret: Secret,
                   kdf: KdfParams | None = None) -> tuple[KmsStore, Secret]:
        """Create a new state file with a fresh random root key; refuse to overwrite one.

        Returns the store and the (unsealed) root key.
        """
        p = Path(path)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(f"{p} already exists; refusing to replace a KMS root key") from None
        except OSError as e:
            raise UsageError(f"cannot create {p}: {e.strerror}") from None
        os.close(fd)
        try:
            kdf = kdf or KdfParams.default()
            kdf_json = json.dumps(kdf.to_dict(), sort_keys=True).encode()
            root = Secret.generate()
            sealed = wrap_key(derive_from_passphrase(operator_secret, kdf), root,
                              _root_ad(kdf_json))
            conn = sqlite3.connect(p, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
                conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("format", str(FORMAT_VERSION).encode()), ("kdf", kdf_json),
                    ("sealed_root", sealed), ("created_at", str(int(time.time())).encode())])
            finally:
                conn.close()
        except BaseException:
            p.unlink(missing_ok=True)
            raise
        return cls(p), root

    def unlock(self, operator_secret: Secret) -> Secret:
        """The root key, unsealed with the operator secret."""
        with self._connect() as conn:
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        try:
            if int(meta["format"]) != FORMAT_VERSION:
                raise FormatError
            kdf_json = bytes(meta["kdf"])
            kdf = KdfParams.from_dict(json.loads(kdf_json))
            sealed = bytes(meta["sealed_root"])
        except (KeyError, ValueError, TypeError, FormatError):
            raise KmsError("KMS state file is not a sealfs KMS state of a known version") from None
        try:
            return unwrap_key(derive_from_passphrase(operator_secret, kdf), sealed,
                              _root_ad(kdf_json))
        except AuthError:
            raise UnlockError("wrong operator secret for this KMS state file") from None

    # --- policies ----------------------------------------------------------------------------

    def put_policy(self, macs: StoreMac, policy: AppPolicy) -> None:
        body = policy.canonical()
        with self._connect(write=True) as conn:
            conn.execute("INSERT OR REPLACE INTO policies VALUES (?, ?, ?)",
                         (policy.app_id, body, macs.policy(policy.app_id, body)))

    def get_policy(self, macs: StoreMac, app_id: bytes) -> AppPolicy | None:
        with self._connect() as conn:
            row = conn.execute("SELECT body, mac FROM policies WHERE app_id = ?",
                               (app_id,)).fetchone()
        return None if row is None else self._load_policy(macs, app_id, row[0], row[1])

    def list_policies(self, macs: StoreMac) -> list[AppPolicy]:
        with self._connect() as conn:
            rows = conn.execute("SELECT app_id, body, mac FROM policies ORDER BY app_id").fetchall()
        return [self._load_policy(macs, bytes(a), b, m) for a, b, m in rows]

    def delete_policy(self, app_id: bytes) -> bool:
        with self._connect(write=True) as conn:
            return conn.execute("DELETE FROM policies WHERE app_id = ?", (app_id,)).rowcount > 0

    def rotate_policy(self, macs: StoreMac, app_id: bytes) -> AppPolicy:
        """Bump an app's current key version (old versions stay derivable)."""
        with self._connect(write=True) as conn:
            row = conn.execute("SELECT body, mac FROM policies WHERE app_id = ?",
                               (app_id,)).fetchone()
            if row is None:
                raise UsageError(f"no policy for app id {app_id.hex()}")
            old = self._load_policy(macs, app_id, row[0], row[1])
            new = old.with_version(old.key_version + 1)
            body = new.canonical()
            conn.execute("UPDATE policies SET body = ?, mac = ? WHERE app_id = ?",
                         (body, macs.policy(app_id, body), app_id))
        return new

    @staticmethod
    def _load_policy(macs: StoreMac, app_id: bytes, body: bytes, tag: bytes) -> AppPolicy:
        body, tag = _blob(body), _blob(tag)
        if not ct_equal(macs.policy(app_id, body), tag):
            log.error("KMS state: policy row for app %s fails its MAC (tampered state file?)",
                      app_id.hex())
            raise IntegrityError(f"KMS state: policy for app {app_id.hex()} fails its MAC")
        policy = AppPolicy.from_dict(json.loads(body))
        if policy.app_id != app_id:
            raise IntegrityError(f"KMS state: policy row for app {app_id.hex()} is misplaced")
        return policy

    # --- epochs ------------------------------------------------------------------------------

    def get_epoch(self, macs: StoreMac, app_id: bytes, volume_id: bytes) -> EpochRecord | None:
        with self._connect() as conn:
            return self._read_epoch(conn, macs, app_id, volume_id)

    def advance_epoch(self, macs: StoreMac, app_id: bytes, volume_id: bytes, epoch: int,
                      root_digest: bytes) -> EpochRecord:
        """Atomically accept ``epoch`` if it moves forward (or repeats the same state).

        Same epoch and digest: idempotent, nothing changes. Same epoch, other digest: a fork
        (two diverging histories); lower epoch: a rollback. Both raise EpochConflict.
        """
        with self._connect(write=True) as conn:
            current = self._read_epoch(conn, macs, app_id, volume_id)
            if current is not None:
                if epoch < current.epoch:
                    raise EpochConflict("rollback", f"epoch {epoch} is older than the KMS epoch "
                                        "for this volume (rollback refused)")
                if epoch == current.epoch:
                    if ct_equal(root_digest, current.root_digest):
                        return current
                    raise EpochConflict("fork", f"epoch {epoch} already anchored with a "
                                        "different root digest (fork refused)")
            now = int(time.time())
            conn.execute("INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?, ?, ?)",
                         (app_id, volume_id, epoch, root_digest, now,
                          macs.epoch(app_id, volume_id, epoch, root_digest)))
            return EpochRecord(epoch, root_digest, now)

    @staticmethod
    def _read_epoch(conn: sqlite3.Connection, macs: StoreMac, app_id: bytes,
                    volume_id: bytes) -> EpochRecord | None:
        row = conn.execute("SELECT epoch, root_digest, updated_at, mac FROM epochs "
                           "WHERE app_id = ? AND volume_id = ?", (app_id, volume_id)).fetchone()
        if row is None:
            return None
        if not isinstance(row[0], int) or not isinstance(row[2], int):
            raise IntegrityError("KMS state: an epoch record is malformed")
        epoch, digest, updated, tag = row[0], _blob(row[1]), row[2], _blob(row[3])
        if not ct_equal(macs.epoch(app_id, volume_id, epoch, digest), tag):
            log.error("KMS state: epoch row for app %s volume %s fails its MAC "
                      "(tampered state file?)", app_id.hex(), volume_id.hex())
            raise IntegrityError("KMS state: an epoch record fails its MAC")
        return EpochRecord(epoch, digest, updated)


def _blob(value: object) -> bytes:
    """A BLOB column's value; anything else (an edited row's TEXT, INTEGER) fails its MAC."""
    if isinstance(value, bytes | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise IntegrityError("KMS state: a row holds a value of the wrong type")


class FormatError(Exception):
    """Internal marker: the meta table does not describe a known format."""
