"""`sealfs rekey` on real volumes, mounted for real: the tree survives, the checker is
clean, an old header copy plus the old credential opens nothing that remains, a SIGKILL at
any point is finished by a rerun (the volume reading correctly in between), and a mounted
volume is refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from sealfs import failpoints
from sealfs.crypto import AuthError
from sealfs.fs.lifecycle import unlock_volume, volume_objects
from sealfs.fs.metalog import MetaLog
from sealfs.fs.rekey import CRASH_POINTS
from sealfs.sealed.codec import CodecError
from sealfs.sealed.objects import SealedObjects
from sealfs.store import CHECKPOINT_NAME, HEADER_NAME
from sealfs.volume.header import Header, read_key_file
from tests.backing import flip_bit, layout, legacy_contents, legacy_volume, snapshot
from tests.conftest import REPO, SEALFS, Volume, new_volume, sealfs

pytestmark = pytest.mark.mount

CHEAP_KDF = ("--kdf-memory", "8M", "--kdf-iterations", "1")


def write_tree(root: Path) -> None:
    """Sparse, compressible (lz4), incompressible, inline, xattrs, hard links, a symlink."""
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "a.txt").write_text("alpha\n" * 20000)
    (root / "d" / "sub" / "big").write_bytes(os.urandom(700_000))
    (root / "small").write_bytes(b"inline")
    os.link(root / "d" / "a.txt", root / "d" / "hard")
    os.setxattr(root / "d" / "a.txt", "user.note", b"kept through the re-key")
    os.setxattr(root / "d", "user.dir", b"x" * 300)
    with open(root / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"end")
    os.symlink("d/a.txt", root / "link")
    for i in range(12):
        (root / "d" / f"f{i}").write_bytes(os.urandom(1000 + 5000 * i))


def filled(tmp_path: Path) -> tuple[Volume, dict[str, tuple[object, ...]]]:
    vol = new_volume(tmp_path, "--compression", "lz4", "--block-size", "64K")
    vol.mount()
    write_tree(vol.mnt)
    vol.umount()
    vol.mount()
    tree = snapshot(vol.mnt)
    vol.umount()
    return vol, tree


def rekey(vol: Volume, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sealfs("rekey", str(vol.backing), "--key-file", str(vol.key), *extra, check=check)


def check_clean(vol: Volume) -> dict[str, object]:
    res = sealfs("check", str(vol.backing), "--key-file", str(vol.key), "--json", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    report: dict[str, object] = json.loads(res.stdout)
    return report


def mounted_tree(vol: Volume) -> dict[str, tuple[object, ...]]:
    vol.mount()
    try:
        return snapshot(vol.mnt)
    finally:
        vol.umount()


def old_key_openings(backing: Path, key: Path, old_header: bytes) -> list[str]:
    """Everything in ``backing`` that the keys of ``old_header`` (unlocked with ``key``)
    still open, found by the current state's identities: every object file, the checkpoint,
    every journal frame."""
    cred = read_key_file(key)
    old = Header.from_bytes(old_header)
    old_objects = SealedObjects(old.volume_keys(old.unlock(cred)), old.block_size)
    found = []
    entries = layout(backing, key).entries.values()
    store, header, master = unlock_volume(backing, cred)
    MetaLog(store, volume_objects(header, master)).load()  # objects carried in the journal
    identified: set[int] = set()
    for e in entries:
        identified.add(e.record_oid)
        try:
            old_objects.open_record(e.ino, e.record_oid, store.get(e.record_oid, 1 << 28))
            found.append(f"record of {e.path}")
        except (AuthError, CodecError):
            pass
        for index, oid in e.block_oids.items():
            identified.add(oid)
            try:
                old_objects.open_block(e.ino, index, oid, store.get(oid, 1 << 24))
                found.append(f"block {index} of {e.path}")
            except (AuthError, CodecError):
                pass
    assert set(store.list_objects()) | set(store.carried) == identified  # and no orphans
    store.set_carried({})
    try:
        MetaLog(store, old_objects).load()
        found.append("checkpoint")
    except Exception:  # noqa: BLE001 - refused, as it must be
        pass
    store.close()
    return found


def test_rekey_keeps_the_tree_and_revokes_the_old_header(tmp_path: Path) -> None:
    vol, tree = filled(tmp_path)
    old_header = (vol.backing / HEADER_NAME).read_bytes()
    assert old_key_openings(vol.backing, vol.key, old_header)  # the probe sees old objects
    res = sealfs("rekey", str(vol.backing), "--key-file", str(vol.key), "--json")
    summary = json.loads(res.stdout)
    assert summary["ok"] and not summary["resumed"] and summary["objects_resealed"] > 20
    assert summary["bytes"] > 1_000_000 and summary["mib_per_second"] > 0
    assert [s["id"] for s in summary["slots"]] == [0]

    new_header = (vol.backing / HEADER_NAME).read_bytes()
    assert "rekey" not in json.loads(new_header)
    assert check_clean(vol)["ok"]
    assert mounted_tree(vol) == tree
    assert old_key_openings(vol.backing, vol.key, old_header) == []

    # the old header put back: the old key file still unwraps the old master key (a copy
    # of a header cannot be revoked), but nothing it opens is left
    (vol.backing / HEADER_NAME).write_bytes(old_header)
    res = sealfs("check", str(vol.backing), "--key-file", str(vol.key), check=False)
    assert res.returncode == 5 and "checkpoint" in res.stdout + res.stderr
    res = sealfs("mount", str(vol.backing), str(vol.mnt), "--key-file", str(vol.key), check=False)
    assert res.returncode == 5 and "failed verification" in res.stderr


def test_format_1_volume_is_rekeyed_to_format_2_objects_only(tmp_path: Path) -> None:
    vol = legacy_volume(tmp_path)
    old_header = (vol.backing / HEADER_NAME).read_bytes()
    assert json.loads(old_header)["format_version"] == 1
    rekey(vol)
    header = json.loads((vol.backing / HEADER_NAME).read_bytes())
    assert header["format_version"] == 2 and "format1_objects" not in header
    assert check_clean(vol)["ok"]
    assert old_key_openings(vol.backing, vol.key, old_header) == []
    vol.mount()
    try:
        for path, data in legacy_contents().items():
            assert (vol.mnt / path.lstrip("/")).read_bytes() == data
        assert os.getxattr(vol.mnt / "dir", "user.legacy") == b"format-1 xattr"
    finally:
        vol.umount()


def test_slots_need_their_secret_or_an_explicit_drop(tmp_path: Path) -> None:
    vol, tree = filled(tmp_path)
    key2 = tmp_path / "key2"
    pw = tmp_path / "pw"
    pw.write_bytes(b"a long recovery passphrase\n")
    pw.chmod(0o600)
    sealfs("key", "add", str(vol.backing), "--key-file", str(vol.key), "--new-key-file", str(key2))
    sealfs(
        "key", "add", str(vol.backing), "--key-file", str(vol.key),
        "--new-passphrase-file", str(pw), *CHEAP_KDF,
    )  # fmt: skip
    before = (vol.backing / HEADER_NAME).read_bytes()
    stranger = tmp_path / "stranger"
    stranger.write_bytes(os.urandom(64))
    stranger.chmod(0o600)
    res = rekey(vol, "--keep-key-file", str(stranger), "--drop-other-slots", check=False)
    assert res.returncode == 2 and "key file given to keep opens no slot" in res.stderr
    res = rekey(vol, "--keep-key-file", str(key2), check=False)
    assert res.returncode == 2 and "slot 2 (passphrase)" in res.stderr
    assert "--drop-other-slots" in res.stderr
    assert (vol.backing / HEADER_NAME).read_bytes() == before  # refused up front

    res = rekey(vol, "--keep-key-file", str(key2), "--keep-passphrase-file", str(pw), "--json")
    assert [(s["id"], s["type"]) for s in json.loads(res.stdout)["slots"]] == [
        (0, "keyfile"),
        (1, "keyfile"),
        (2, "passphrase"),
    ]
    for unlock in (["--key-file", str(key2)], ["--passphrase-file", str(pw)]):
        assert sealfs("check", str(vol.backing), *unlock, check=False).returncode == 0

    res = rekey(vol, "--drop-other-slots", "--json")
    assert [s["id"] for s in json.loads(res.stdout)["dropped_slots"]] == [1, 2]
    assert sealfs("check", str(vol.backing), "--key-file", str(key2), check=False).returncode == 3
    assert mounted_tree(vol) == tree


def test_damaged_object_stops_the_rekey_and_names_it(tmp_path: Path) -> None:
    vol, _ = filled(tmp_path)
    big = layout(vol.backing, vol.key).entries["/d/sub/big"]
    flip_bit(big.block(3))
    res = rekey(vol, check=False)
    assert res.returncode == 5 and f"{big.block_oids[3]:016x}" in res.stderr
    assert "sealfs check --repair" in res.stderr and res.stderr.count("\n") == 1
    vol.mount()  # the rest still reads, under either key
    try:
        assert (vol.mnt / "small").read_bytes() == b"inline"
        assert (vol.mnt / "d" / "a.txt").read_text() == "alpha\n" * 20000
    finally:
        vol.umount()


def test_mounted_volume_is_refused(tmp_path: Path) -> None:
    vol, _ = filled(tmp_path)
    before = (vol.backing / HEADER_NAME).read_bytes()
    vol.mount()
    try:
        res = rekey(vol, check=False)
    finally:
        vol.umount()
    assert res.returncode == 6 and "unmounted volume only" in res.stderr
    assert res.stderr.count("\n") == 1  # one line, no traceback
    assert (vol.backing / HEADER_NAME).read_bytes() == before


def _signatures(backing: Path) -> dict[str, int]:
    """The inode number of the header, the checkpoint and every object file: a re-key
    replaces each by rename, so a changed number is one event of its progress."""
    out = {}
    for name in (HEADER_NAME, CHECKPOINT_NAME):
        out[name] = (backing / name).stat().st_ino
    for path in (backing / "objects").glob("*/*"):
        if not path.name.startswith("."):
            out[path.name] = path.lstat().st_ino
    return out


def _kill_after(vol: Volume, events: int) -> int | None:
    """Run a re-key (one object per syncfs) and SIGKILL it once ``events`` files were
    replaced; return its exit status if it finished first."""
    start = _signatures(vol.backing)
    proc = subprocess.Popen(
        [*SEALFS, "rekey", str(vol.backing), "--key-file", str(vol.key), "--batch", "1"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None:
        try:
            now = _signatures(vol.backing)
        except FileNotFoundError:  # renamed under the scan
            continue
        if sum(1 for k, v in now.items() if start.get(k, v) != v) >= events:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    return None if proc.returncode == -signal.SIGKILL else proc.returncode


def killed_at(vol: Volume, point: str) -> None:
    """Run a re-key of ``vol`` that SIGKILLs itself at its crash point ``point``."""
    res = subprocess.run(
        [*SEALFS, "rekey", str(vol.backing), "--key-file", str(vol.key)],
        cwd=REPO,
        capture_output=True,
        env={**os.environ, failpoints.ENV: f"rekey:{point}"},
    )
    assert res.returncode == -signal.SIGKILL, res.stderr


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at_each_phase_boundary_then_rerun(tmp_path: Path, point: str) -> None:
    """The phase boundaries the polled kills below may miss (the final commit and header)."""
    vol, tree = filled(tmp_path)
    old_header = (vol.backing / HEADER_NAME).read_bytes()
    killed_at(vol, point)
    assert mounted_tree(vol) == tree and check_clean(vol)["ok"]
    assert json.loads(rekey(vol, "--json").stdout)["resumed"]
    assert check_clean(vol)["ok"] and mounted_tree(vol) == tree
    assert old_key_openings(vol.backing, vol.key, old_header) == []


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_sigkill_at_random_points_then_rerun(tmp_path: Path, seed: int) -> None:
    vol, tree = filled(tmp_path)
    old_header = (vol.backing / HEADER_NAME).read_bytes()
    total = len(_signatures(vol.backing))
    events = random.Random(seed).randrange(1, total)
    assert _kill_after(vol, events) is None, "the re-key finished before the kill point"
    # in between, the volume mounts and reads correctly, and its check is clean
    notes = check_clean(vol)["notes"]
    assert isinstance(notes, list) and any("rekey in progress" in n for n in notes)
    assert mounted_tree(vol) == tree
    assert "rekey in progress" in vol.log_text()
    assert "rekey:         in progress" in sealfs("info", str(vol.backing)).stdout
    res = rekey(vol, "--json")
    assert json.loads(res.stdout)["resumed"]  # the first event is the new header
    assert "rekey" not in json.loads((vol.backing / HEADER_NAME).read_bytes())
    assert check_clean(vol)["ok"]
    assert mounted_tree(vol) == tree
    assert old_key_openings(vol.backing, vol.key, old_header) == []
    assert not list((vol.backing / "objects").glob("*/.*"))  # no staged leftovers


def test_directory_planted_at_a_staged_name_is_a_one_line_error(tmp_path: Path) -> None:
    """The host plants a directory at an ``objects/xx/.<id>.new`` name: the re-key stops with
    a one-line error naming it (it was an internal error), and finishes once it is gone."""
    vol = new_volume(tmp_path)
    planted = vol.backing / "objects" / "ab" / ".ab00000000000000.new"
    (planted / "x").mkdir(parents=True)
    refused = sealfs("rekey", str(vol.backing), "--key-file", str(vol.key), check=False)
    assert refused.returncode == 5 and refused.stderr.count("\n") == 1, refused.stderr
    assert "objects/ab/.ab00000000000000.new is a directory" in refused.stderr
    (planted / "x").rmdir()
    planted.rmdir()
    sealfs("rekey", str(vol.backing), "--key-file", str(vol.key))
    assert sealfs("check", str(vol.backing), "--key-file", str(vol.key)).returncode == 0


def test_a_mid_rekey_header_put_back_afterwards_does_not_revive_the_old_key(
    tmp_path: Path,
) -> None:
    """The host keeps the header from the middle of a re-key (its ``rekey`` field wraps the
    replaced master key under the new one) and puts it back once the re-key finished; whoever
    holds the replaced key (why one re-keys) seals a block of their choosing under it. That
    block was served as the file's content; now the checkpoint written when the re-key
    finished tells every reader the previous key is retired: the block reads EIO, the rest
    reads, and a rerun of the re-key refuses it instead of sealing it under the new key."""
    vol, tree = filled(tmp_path)
    old_header = (vol.backing / HEADER_NAME).read_bytes()
    killed_at(vol, "checkpoint-written")
    mid_header = (vol.backing / HEADER_NAME).read_bytes()
    assert "rekey" in json.loads(mid_header)
    rekey(vol)
    big = layout(vol.backing, vol.key).entries["/d/sub/big"]
    old = Header.from_bytes(old_header)
    forger = SealedObjects(old.volume_keys(old.unlock(read_key_file(vol.key))), old.block_size)
    forged = forger.seal_block(big.ino, 0, big.block_oids[0], b"forged" * 1000)
    big.block(0).unlink()
    big.block(0).write_bytes(forged)
    (vol.backing / HEADER_NAME).write_bytes(mid_header)
    vol.mount()
    try:
        with pytest.raises(OSError) as read:
            (vol.mnt / "d" / "sub" / "big").read_bytes()
        assert read.value.errno == 5
        assert (vol.mnt / "d" / "a.txt").read_text() == "alpha\n" * 20000
    finally:
        vol.umount()
    res = rekey(vol, check=False)
    assert res.returncode == 5 and f"{big.block_oids[0]:016x}" in res.stderr, res.stderr
