"""A mounted volume keeps committing and anchoring when the KMS replica it used dies: two real
`sealfs kms serve` replicas on one state file, a real FUSE mount given both URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealfs.volume.header import load_header
from tests.conftest import new_volume, sealfs

from .conftest import KmsState, start_kms
from .mounting import anchored, mount_args, replica_args, replicated_volume, write_synced

pytestmark = pytest.mark.mount


def test_mount_survives_the_death_of_its_replica(tmp_path: Path, state: KmsState) -> None:
    one = start_kms(state, "--allow-simulated", log_name="mount-replica1.log")
    two = start_kms(state, "--allow-simulated", log_name="mount-replica2.log")
    vol = replicated_volume(tmp_path, [one, two])
    try:
        mount = mount_args(vol, [one, two])
        sealfs(*mount)
        write_synced(vol.mnt / "before", b"committed while replica 1 serves")
        sealfs("umount", str(vol.mnt))  # anchors through replica 1, the first
        assert " /v1/epoch/advance -> 200" in one.log()
        at_first = anchored(two, vol)
        assert at_first > 0

        sealfs(*mount)
        one.proc.kill()  # replica 1 dies mid-mount
        one.proc.wait()
        for i in range(20):
            write_synced(vol.mnt / f"after-{i}", b"x" * 4096 * (i + 1))
        sealfs("umount", str(vol.mnt))  # its final anchor advance must reach replica 2

        assert anchored(two, vol) > at_first
        assert " /v1/epoch/advance -> 200" in two.log()
        daemon_log = vol.log_text()
        assert "could not advance the freshness anchor" not in daemon_log
        assert "trying the next replica" in daemon_log

        # Mounting again with the dead replica still listed first: unlock, freshness check
        # and anchor all go to replica 2, and the data is all there.
        sealfs(*mount)
        assert (vol.mnt / "before").read_bytes() == b"committed while replica 1 serves"
        assert (vol.mnt / "after-19").read_bytes() == b"x" * 4096 * 20
        sealfs("umount", str(vol.mnt))
    finally:
        vol.force_unmount()
        one.stop()
        two.stop()


def test_create_with_replicas_records_the_first_as_a_hint(tmp_path: Path, state: KmsState) -> None:
    """The kms slot keeps one URL, informational: the URLs to use come from the command line."""
    one = start_kms(state, "--allow-simulated", log_name="hint.log")
    try:
        dead = "http://127.0.0.1:9"
        vol = new_volume(tmp_path, *replica_args([one]), "--kms", dead)
        slot = load_header(vol.backing).kms_slot()
        assert slot is not None and slot.kms is not None
        assert slot.kms["url"] == one.url
    finally:
        one.stop()
