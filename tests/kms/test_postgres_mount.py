"""A real FUSE mount anchored through two `sealfs kms serve` replicas on one PostgreSQL
database (a real server, tests/kms/postgres.py), one of them killed during a stream of
mount/commit/unmount cycles.

Every cycle's unmount anchors the volume's last commit, so the stream is bound by those
events, not by the 30 s periodic advance. What must hold: no write or fsync fails (the daemon
only retries the next replica), every cycle's anchor is a new, later commit (none lost), and
at the end the database holds exactly the volume's last commit and head, which a check and a
mount through the surviving replica verify and the killed replica, restarted, agrees with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import sealfs

from .conftest import KmsState
from .mounting import anchor_at, mount_args, replica_args, replicated_volume, write_synced
from .postgres import replica

pytestmark = pytest.mark.mount

CYCLES = 6  # mount, fsync'd writes, unmount (which anchors)
KILLED_IN = 2  # the cycle during which replica one dies, mounted, between fsyncs
WRITES = 5  # fsync'd files per cycle


def test_mount_stream_survives_a_replica_on_postgres(tmp_path: Path, pg_state: KmsState) -> None:
    one, two = replica(pg_state, "one"), replica(pg_state, "two")
    vol = replicated_volume(tmp_path, [one, two])
    try:
        mount = mount_args(vol, [one, two])  # the dead one stays listed first
        anchors = []
        for cycle in range(CYCLES):
            sealfs(*mount)
            for i in range(WRITES):
                if cycle == KILLED_IN and i == WRITES // 2:
                    one.proc.kill()  # mid-mount, between fsyncs
                    assert one.proc.wait(10) != 0
                write_synced(vol.mnt / f"c{cycle}-{i}", bytes([cycle]) * 4096 * (i + 1))
            sealfs("umount", str(vol.mnt))  # flushes, commits, anchors
            anchors.append(anchor_at(two, vol))
        epochs = [e for e, _ in anchors]
        assert epochs == sorted(set(epochs)), f"an anchor went back or stood still: {epochs}"
        daemon_log = vol.log_text()
        assert "trying the next replica" in daemon_log
        assert "could not advance the freshness anchor" not in daemon_log
        assert " /v1/epoch/advance -> 200" in one.log()  # it served before it died...
        assert " /v1/epoch/advance -> 200" in two.log()  # ...and two took over

        # the database holds exactly the volume's last commit: check through the survivor
        # alone replays the disk and compares (exit 0: fresh and intact)
        checked = json.loads(
            sealfs("check", str(vol.backing), *replica_args([two]), "--quick", "--json").stdout
        )
        final = anchors[-1]
        assert (checked["epoch"], checked["head"]) == (final[0], final[1].hex())
        assert pg_state.store.verify(pg_state.macs).epochs == 1

        # the killed replica, restarted on its own high-water file, agrees and serves a mount
        back = replica(pg_state, "one")
        try:
            assert anchor_at(back, vol) == final
            sealfs(*mount_args(vol, [back]))
            for cycle in range(CYCLES):
                got = (vol.mnt / f"c{cycle}-{WRITES - 1}").read_bytes()
                assert got == bytes([cycle]) * 4096 * WRITES
            sealfs("umount", str(vol.mnt))
            assert anchor_at(two, vol)[0] >= final[0]
        finally:
            back.stop()
    finally:
        vol.force_unmount()
        one.stop()
        two.stop()
