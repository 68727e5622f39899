"""Real FUSE mounts of a KMS-unlocked volume given several replica URLs: the command-line
arguments, a fresh volume, and the anchor as one replica sees it. Shared by the failover
tests on one SQLite file and on PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

from sealfs.kms.client import KmsClient
from sealfs.volume.header import load_header
from tests.conftest import Volume, sealfs

from .conftest import APP_A, COMPOSE_A, KmsProcess, attester


def replica_args(replicas: list[KmsProcess]) -> list[str]:
    """``--kms URL`` for each replica, in order (the client tries them so), plus the shared
    public key and the simulated attestation of app A."""
    args = []
    for r in replicas:
        args += ["--kms", r.url]
    return [
        *args,
        "--kms-public-key",
        replicas[0].public_key.hex(),
        "--app-id",
        APP_A.hex(),
        "--attester",
        "simulated",
        "--compose-hash",
        COMPOSE_A.hex(),
        "--kms-deadline",
        "30",
    ]


def replicated_volume(tmp_path: Path, replicas: list[KmsProcess]) -> Volume:
    """A new volume created through ``replicas``, not mounted."""
    vol = Volume(tmp_path / "backing", tmp_path / "key", tmp_path / "mnt", tmp_path / "s.log")
    vol.mnt.mkdir()
    vol.key.write_bytes(os.urandom(64))
    vol.key.chmod(0o600)
    sealfs("create", str(vol.backing), *replica_args(replicas), "--key-file", str(vol.key))
    return vol


def mount_args(vol: Volume, replicas: list[KmsProcess]) -> list[str]:
    return [
        "mount",
        str(vol.backing),
        str(vol.mnt),
        *replica_args(replicas),
        "--log-file",
        str(vol.log),
    ]


def anchor_at(replica: KmsProcess, vol: Volume) -> tuple[int, bytes]:
    """The volume's anchored ``(commit, head)``, as a replica sees it."""
    c = KmsClient(replica.url, APP_A, attester(), trusted_keys=[replica.public_key])
    return c.get_epoch(load_header(vol.backing).volume_id)


def anchored(replica: KmsProcess, vol: Volume) -> int:
    """The volume's anchored commit, as a replica sees it."""
    return anchor_at(replica, vol)[0]


def write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
