"""The high-water file: a replica's own record of the highest state version it served
catches a state file put back to an older copy while the KMS was stopped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sealfs.crypto import Secret
from sealfs.errors import IntegrityError, UsageError
from sealfs.kms.derivation import StoreMac
from sealfs.kms.highwater import HighWater
from sealfs.kms.store import KmsStore, StateRolledBack

from .conftest import APP_A, make_state


def test_older_copy_restored_while_stopped_is_refused(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    record = HighWater(tmp_path / "served", state.macs)
    state.store.remember_in(record)
    state.store.advance_epoch(state.macs, APP_A, b"vol", 1, b"\1" * 32)
    shutil.copyfile(state.path, tmp_path / "old.db")  # WAL checkpointed on close
    state.store.advance_epoch(state.macs, APP_A, b"vol", 2, b"\2" * 32)
    served = record.load()
    assert served == state.store.seen_version
    shutil.copyfile(tmp_path / "old.db", state.path)
    for suffix in ("-wal", "-shm"):
        Path(f"{state.path}{suffix}").unlink(missing_ok=True)
    restarted = KmsStore(state.path)  # a new process: nothing in memory
    assert restarted.verify(state.macs).version < served  # the copy is consistent in itself
    restarted.remember_in(HighWater(tmp_path / "served", state.macs))
    with pytest.raises(StateRolledBack, match=f"went back from {served} to"):
        restarted.verify(state.macs)


def test_high_water_file_of_another_root_or_edited_is_refused(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    path = tmp_path / "served"
    HighWater(path, state.macs).store(7)
    assert HighWater(path, state.macs).load() == 7
    with pytest.raises(IntegrityError, match="fails its MAC"):
        HighWater(path, StoreMac(Secret.generate())).load()
    path.write_bytes(path.read_bytes().replace(b"\n7 ", b"\n1 "))
    with pytest.raises(IntegrityError, match="fails its MAC"):
        HighWater(path, state.macs).load()
    path.write_bytes(b"junk")
    with pytest.raises(UsageError, match="not one sealfs wrote"):
        HighWater(path, state.macs).load()
