"""Replicas cross-check the highest state version each has served.

A replica's own high-water file (:mod:`sealfs.kms.highwater`) catches a database that went
back behind what *that* replica served. It cannot help a replica that never saw the newer
state: one started fresh, or one whose disk was restored too. So each replica publishes, in
``GET /v1/info``, the highest version it has served, signed with the KMS identity key (which
every replica of one state shares), and asks its peers (``kms serve --peer URL``) at start and
then periodically: a signed version above its own floor raises the floor (and its high-water
file), so the replica refuses a database older than anything *any* reachable replica served.

Asking the database instead would not do: a restored database tells every replica the same,
older, story. A peer that cannot be reached, or whose answer does not verify, is logged and
skipped (the check only ever raises the floor, so a hostile network can deny it, never lower
it or forge a higher one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from sealfs import strict
from sealfs.crypto import verify_signature
from sealfs.errors import KmsError
from sealfs.kms import protocol as P
from sealfs.kms.client import Replica, exchange
from sealfs.kms.store import KmsStore

log = logging.getLogger("sealfs.kms")


def served_by(url: str, public_key: bytes, timeout_s: float) -> int:
    """The highest state version the replica at ``url`` says it served, checked against its
    signature under ``public_key``; KmsError if it cannot be asked or does not verify."""
    try:  # one bound for the whole exchange: a trickling peer may not stall this replica
        info = exchange(Replica.parse(url), "GET", "/v1/info", None, timeout_s)
    except KmsError as e:
        raise KmsError(f"cannot ask peer {url}: {e}") from None
    try:
        version = info["served_version"]
        signature = bytes.fromhex(info["served_signature"])
        if not strict.integer_in(version, 0, 2**63 - 1):
            raise ValueError("bad served_version")
    except (ValueError, KeyError, TypeError) as e:
        raise KmsError(f"peer {url} answered no served version ({e})") from None
    if not verify_signature(public_key, signature, P.served_message(version)):
        raise KmsError(f"peer {url}: served version not signed by this KMS's identity key")
    return int(version)


def cross_check(
    store: KmsStore, public_key: bytes, peers: Sequence[str], timeout_s: float = 5.0
) -> None:
    """Raise ``store``'s floor to the highest version any reachable peer served."""
    for url in peers:
        try:
            version = served_by(url, public_key, timeout_s)
        except KmsError as e:
            log.warning("state cross-check: %s", e.message)
            continue
        if version > store.seen_version:
            log.info(
                "state cross-check: peer %s served state version %d (this replica: %d)",
                url,
                version,
                store.seen_version,
            )
            store.saw(version)


async def cross_check_every(
    interval_s: float, store: KmsStore, public_key: bytes, peers: Sequence[str]
) -> None:
    """:func:`cross_check` every ``interval_s`` seconds, in a worker thread, forever."""
    while True:
        await trio.sleep(interval_s)
        await trio.to_thread.run_sync(cross_check, store, public_key, peers)
