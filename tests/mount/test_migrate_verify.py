"""`sealfs migrate import --verify-data`: the manifest proves the bundle holds the bytes the
export read, not that they were sound. An object damaged on the old host's disk before the
final export is hashed and carried faithfully — a plain import installs it — while
--verify-data decrypts every object of the staged volume (the full `sealfs check`) and refuses
the bundle in one line, exit 5, with nothing installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sealfs.migrate.state import committed_state, object_name
from sealfs.store import ObjectStore
from sealfs.volume.header import load_header, read_key_file
from tests.backing import flip_bit
from tests.conftest import Volume, sealfs

pytestmark = pytest.mark.mount


def migrate(*args: str, vol: Volume, check: bool = True):  # type: ignore[no-untyped-def]
    return sealfs("migrate", *args, "--key-file", str(vol.key), check=check)


def block_objects(vol: Volume) -> list[str]:
    """The data objects (not inode records) the volume's committed state refers to."""
    header = load_header(vol.backing)
    store = ObjectStore(vol.backing)
    try:
        state, referenced = committed_state(store, header, header.unlock(read_key_file(vol.key)))
    finally:
        store.close()
    return [object_name(o) for o in sorted(referenced - set(state.table.values()))]


def test_verify_data_refuses_a_bundle_damaged_before_export(tmp_path: Path, volume: Volume) -> None:
    volume.mount()
    (volume.mnt / "big").write_bytes(os.urandom(300_000))
    volume.umount()
    clean = tmp_path / "clean"
    migrate("export", str(volume.backing), str(clean), "--final", vol=volume)
    out = migrate("import", str(clean), str(tmp_path / "ok"), "--verify-data", "--json", vol=volume)
    assert json.loads(out.stdout)["data_verified"] is True

    victim = block_objects(volume)[0]
    flip_bit(volume.backing / victim)  # damaged on the old host's disk
    bundle = tmp_path / "bundle"
    migrate("export", str(volume.backing), str(bundle), "--final", vol=volume)
    listed = json.loads((bundle / "sealfs-migrate.manifest").read_text())["manifest"]["files"]
    assert victim in {f[0] for f in listed}  # hashed as it was read: the manifest holds

    carried = tmp_path / "carried"
    plain = json.loads(migrate("import", str(bundle), str(carried), "--json", vol=volume).stdout)
    assert plain["ok"] and plain["data_verified"] is False  # a plain import cannot tell

    target = tmp_path / "target"
    res = migrate("import", str(bundle), str(target), "--verify-data", vol=volume, check=False)
    assert res.returncode == 5, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "/big" in res.stderr and victim in res.stderr and "nothing was installed" in res.stderr
    assert not target.exists()
    assert not any(p.name.endswith("migrate-staging") for p in tmp_path.iterdir())
    res = migrate(
        "import", str(bundle), str(target), "--verify-data", "--json", vol=volume, check=False
    )
    assert res.returncode == 5 and json.loads(res.stdout)["error"] == "bundle-data-damaged"
