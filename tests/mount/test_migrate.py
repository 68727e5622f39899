"""`sealfs migrate export/import` with real FUSE mounts: a tree moves intact (live pre-copy
while mounted, final pass unmounted), and a bundle altered on the way is refused with the new
backing directory left absent."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.backing import snapshot
from tests.conftest import REPO, SEALFS, Volume, new_volume, sealfs

pytestmark = pytest.mark.mount

MANIFEST = "sealfs-migrate.manifest"


def write_tree(root: Path) -> None:
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "a.txt").write_text("alpha\n" * 1000)
    (root / "d" / "sub" / "big").write_bytes(os.urandom(300_000))
    os.link(root / "d" / "a.txt", root / "d" / "hard")
    os.setxattr(root / "d" / "a.txt", "user.note", b"carried along")
    with open(root / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end")
    os.symlink("d/a.txt", root / "link")
    os.chmod(root / "d" / "sub", 0o750)


def migrate(*args: str, vol: Volume, check: bool = True):  # type: ignore[no-untyped-def]
    return sealfs("migrate", *args, "--key-file", str(vol.key), check=check)


@pytest.fixture
def bundle(tmp_path: Path, volume: Volume) -> tuple[Volume, Path, dict[str, tuple[object, ...]]]:
    """Volume A with a tree, exported live (twice: the rerun copies nothing) and finally."""
    volume.mount()
    write_tree(volume.mnt)
    os.sync()
    dest = tmp_path / "bundle"
    first = json.loads(
        migrate("export", str(volume.backing), str(dest), "--json", vol=volume).stdout
    )
    assert first["objects_copied"] > 0 and not (dest / MANIFEST).exists()
    again = json.loads(
        migrate("export", str(volume.backing), str(dest), "--json", vol=volume).stdout
    )
    assert again["objects_copied"] == 0  # incremental: nothing new
    refused = migrate("export", str(volume.backing), str(dest), "--final", vol=volume, check=False)
    assert refused.returncode == 6 and "unmount" in refused.stderr
    (volume.mnt / "after-precopy").write_text("written after the live pass")
    tree = snapshot(volume.mnt)
    volume.umount()
    final = migrate("export", str(volume.backing), str(dest), "--final", vol=volume)
    assert "fork" in final.stdout.strip().splitlines()[-1]
    return volume, dest, tree


def test_tree_moves_intact(tmp_path: Path, bundle: tuple[Volume, Path, dict]) -> None:  # type: ignore[type-arg]
    vol, dest, tree = bundle
    new = Volume(tmp_path / "new-backing", vol.key, tmp_path / "new-mnt", tmp_path / "new.log")
    new.mnt.mkdir()
    dry = migrate("import", str(dest), str(new.backing), "--dry-run", vol=vol)
    assert "verified" in dry.stdout and not new.backing.exists()
    out = json.loads(migrate("import", str(dest), str(new.backing), "--json", vol=vol).stdout)
    assert out["ok"] and out["objects"] > 0
    assert not any(p.name.endswith("migrate-staging") for p in tmp_path.iterdir())
    sealfs("check", str(new.backing), "--key-file", str(vol.key))
    new.mount()
    try:
        assert snapshot(new.mnt) == tree
    finally:
        new.umount()


def _flip(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1
    path.write_bytes(bytes(data))


def _objects(dest: Path) -> list[Path]:
    return sorted(p for p in (dest / "objects").rglob("*") if p.is_file())


def _listed(dest: Path) -> set[str]:
    return {f[0] for f in json.loads((dest / MANIFEST).read_text())["manifest"]["files"]}


@pytest.mark.parametrize(
    "attack",
    [
        "object",
        "manifest",
        "journal",
        "drop-object",
        "swap-objects",
        "reorder-listing",
        "truncate-checkpoint",
        "unlisted-manifest",
    ],
)
def test_altered_bundle_refused(
    tmp_path: Path,
    bundle: tuple[Volume, Path, dict],  # type: ignore[type-arg]
    attack: str,
) -> None:
    vol, dest, _ = bundle
    listed = [p for p in _objects(dest) if str(p.relative_to(dest)) in _listed(dest)]
    if attack == "object":
        _flip(listed[0])
    elif attack == "manifest":
        doc = json.loads((dest / MANIFEST).read_text())
        doc["manifest"]["commit"] += 1
        (dest / MANIFEST).write_text(json.dumps(doc))
    elif attack == "journal":
        _flip(next(dest.glob("journal.*")), 10)
    elif attack == "drop-object":
        listed[-1].unlink()
    elif attack == "swap-objects":  # two authentic objects under each other's names
        a, b = listed[0].read_bytes(), listed[-1].read_bytes()
        listed[0].write_bytes(b)
        listed[-1].write_bytes(a)
    elif attack == "reorder-listing":  # the manifest's files listed in another order
        doc = json.loads((dest / MANIFEST).read_text())
        doc["manifest"]["files"].reverse()
        (dest / MANIFEST).write_text(json.dumps(doc))
    elif attack == "truncate-checkpoint":
        cp = dest / "checkpoint"
        cp.write_bytes(cp.read_bytes()[:-1])
    else:
        (dest / MANIFEST).unlink()
    target = tmp_path / "new-backing"
    res = migrate("import", str(dest), str(target), vol=vol, check=False)
    assert res.returncode == 5, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not target.exists()
    # an incomplete bundle may still be arriving: its staging directory stays for the rerun;
    # one refused for its content is removed
    staged = any(p.name.endswith("migrate-staging") for p in tmp_path.iterdir())
    assert staged == (attack in ("drop-object", "unlisted-manifest"))


def test_bundle_of_another_volume_refused(
    tmp_path: Path,
    bundle: tuple[Volume, Path, dict],  # type: ignore[type-arg]
) -> None:
    vol, dest, _ = bundle
    other = new_volume(tmp_path, name="other")
    other_id = json.loads(sealfs("info", str(other.backing), "--json").stdout)["uuid"]
    target = tmp_path / "new-backing"
    res = migrate("import", str(dest), str(target), "--volume-id", other_id, vol=vol, check=False)
    assert res.returncode == 5 and "not the expected" in res.stderr
    # another volume's header put into the bundle: its manifest no longer authenticates
    shutil.copy(other.backing / "sealfs.header", dest / "sealfs.header")
    res = sealfs(
        "migrate", "import", str(dest), str(target), "--key-file", str(other.key), check=False
    )
    assert res.returncode == 5 and "manifest" in res.stderr
    assert not target.exists()


def test_import_refuses_a_nonempty_target(
    tmp_path: Path,
    bundle: tuple[Volume, Path, dict],  # type: ignore[type-arg]
) -> None:
    vol, dest, _ = bundle
    res = migrate("import", str(dest), str(vol.backing), vol=vol, check=False)
    assert res.returncode == 2 and "not an empty directory" in res.stderr


def _stream(vol: Volume) -> bytes:
    res = subprocess.run(
        [*SEALFS, "migrate", "export", str(vol.backing), "-", "--key-file", str(vol.key)],
        capture_output=True,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    assert b"fork" in res.stderr.strip().splitlines()[-1]
    return res.stdout


def _import_stream(data: bytes, target: Path, vol: Volume) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*SEALFS, "migrate", "import", "-", str(target), "--key-file", str(vol.key)],
        input=data,
        capture_output=True,
        cwd=REPO,
        timeout=120,
    )


def test_stream_moves_intact_and_a_cut_stream_is_refused(
    tmp_path: Path,
    bundle: tuple[Volume, Path, dict],  # type: ignore[type-arg]
) -> None:
    vol, _, tree = bundle
    data = _stream(vol)
    target = tmp_path / "new-backing"
    for cut in (700, len(data) // 3, len(data) // 2):
        res = _import_stream(data[:cut], target, vol)
        assert res.returncode == 5, res.stderr
        assert b"cut short" in res.stderr or b"ended" in res.stderr
        assert not target.exists()
    new = Volume(target, vol.key, tmp_path / "new-mnt", tmp_path / "new.log")
    new.mnt.mkdir()
    res = _import_stream(data, target, vol)
    assert res.returncode == 0, res.stderr
    new.mount()
    try:
        assert snapshot(new.mnt) == tree
    finally:
        new.umount()


def test_final_pass_hashes_only_what_the_live_passes_did_not(
    tmp_path: Path, volume: Volume
) -> None:
    """The live passes note each copied object's hash in an authenticated ledger, so the final
    pass (the app's downtime) reads only new objects; a forged ledger is ignored, and an object
    altered in the bundle after its live copy still fails the import."""
    volume.mount()
    (volume.mnt / "big").write_bytes(os.urandom(4 << 20))
    os.sync()
    dest = tmp_path / "bundle"
    migrate("export", str(volume.backing), str(dest), vol=volume)
    (volume.mnt / "delta").write_bytes(os.urandom(1 << 20))  # the downtime's delta
    volume.umount()
    final = json.loads(
        migrate("export", str(volume.backing), str(dest), "--final", "--json", vol=volume).stdout
    )
    assert final["bytes_hashed"] == 0, final  # every old object came with its ledger hash
    assert (1 << 20) <= final["bytes_copied"] < (2 << 20), final  # the delta and metadata

    ledger = dest / "sealfs-migrate.precopy"
    doc = json.loads(ledger.read_text())
    doc["ledger"]["files"][0][2] = "00" * 32  # a forged hash: the MAC no longer holds
    ledger.write_text(json.dumps(doc))
    again = json.loads(
        migrate("export", str(volume.backing), str(dest), "--final", "--json", vol=volume).stdout
    )
    assert again["bytes_hashed"] >= 4 << 20, again  # ignored: everything hashed from the source
    new = tmp_path / "new"
    migrate("import", str(dest), str(new), vol=volume)  # and the bundle is sound

    _flip(max(_objects(dest), key=lambda p: p.stat().st_size))  # altered after its live copy
    res = migrate("import", str(dest), str(tmp_path / "new2"), vol=volume, check=False)
    assert res.returncode == 5 and not (tmp_path / "new2").exists(), res.stderr


def test_final_pass_unmounts_the_volume_it_moves(tmp_path: Path, volume: Volume) -> None:
    """`--umount MOUNTPOINT` unmounts (after the final commit) and runs the final pass at once;
    a mountpoint serving another volume is refused and stays mounted."""
    other = new_volume(tmp_path, name="other")
    volume.mount()
    other.mount()
    try:
        (volume.mnt / "last-write").write_text("committed by the unmount")
        dest = tmp_path / "bundle"
        res = migrate(
            "export",
            str(volume.backing),
            str(dest),
            "--umount",
            str(other.mnt),
            vol=volume,
            check=False,
        )
        assert res.returncode == 2 and "not a sealfs mount of" in res.stderr, res.stderr
        assert os.path.ismount(other.mnt) and os.path.ismount(volume.mnt)
        out = migrate(
            "export", str(volume.backing), str(dest), "--umount", str(volume.mnt), vol=volume
        )
        assert "becomes a stale fork" in out.stdout and not os.path.ismount(volume.mnt)
    finally:
        other.umount()
    new = tmp_path / "new"
    migrate("import", str(dest), str(new), vol=volume)
    moved = Volume(new, volume.key, tmp_path / "new-mnt", tmp_path / "new.log")
    moved.mnt.mkdir()
    moved.mount()
    try:
        assert (moved.mnt / "last-write").read_text() == "committed by the unmount"
    finally:
        moved.umount()


def test_planted_staging_name_is_refused_without_following_it(
    tmp_path: Path,
    bundle: tuple[Volume, Path, dict],  # type: ignore[type-arg]
) -> None:
    """The host knows the staging name beside BACKING_DIR and plants it first: a symlink to a
    directory of its choice or a file. The import refuses in one line (exit 7), touches
    nothing through the link, and leaves the target absent."""
    vol, dest, _ = bundle
    target = tmp_path / "new-backing"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not the importer's")
    stage = tmp_path / ".new-backing.migrate-staging"
    for plant in (lambda: stage.symlink_to(elsewhere), lambda: stage.write_text("x")):
        plant()
        res = migrate("import", str(dest), str(target), vol=vol, check=False)
        assert res.returncode == 7 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "staging" in res.stderr
        assert not target.exists() and sorted(os.listdir(elsewhere)) == ["keep"]
        stage.unlink()
    migrate("import", str(dest), str(target), vol=vol)  # the operator removed it: it works


def test_second_import_into_the_same_target_is_refused_while_one_runs(
    tmp_path: Path,
    bundle: tuple[Volume, Path, dict],  # type: ignore[type-arg]
) -> None:
    """Two imports sharing one staging directory would mix their copies: the one that
    finds it held (flock) is refused in one line (exit 6) and leaves it alone."""
    vol, dest, _ = bundle
    target = tmp_path / "new-backing"
    stage = tmp_path / ".new-backing.migrate-staging"
    stage.mkdir()
    (stage / "checkpoint").write_text("the running import's copy")
    fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = migrate("import", str(dest), str(target), vol=vol, check=False)
        assert res.returncode == 6 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "another import" in res.stderr and not target.exists()
        assert (stage / "checkpoint").read_text() == "the running import's copy"
    finally:
        os.close(fd)
    out = json.loads(migrate("import", str(dest), str(target), "--json", vol=vol).stdout)
    assert out["files_reused"] == 0 and not stage.exists()  # the foreign copy was replaced


def test_export_never_writes_through_a_symlink_planted_in_dest(
    tmp_path: Path, volume: Volume
) -> None:
    """DEST is the host's: an objects/ subdirectory it turned into a symlink must not lead
    the exporter (root in the CVM) to write files elsewhere."""
    volume.mount()
    write_tree(volume.mnt)
    volume.umount()
    # a fan-out directory that holds objects now (superseded ones are deleted in the
    # background, which can leave a directory empty)
    prefix = sorted(p.name for p in (volume.backing / "objects").iterdir() if any(p.iterdir()))[0]
    dest, outside = tmp_path / "bundle", tmp_path / "outside"
    outside.mkdir()
    (dest / "objects").mkdir(parents=True)
    (dest / "objects" / prefix).symlink_to(outside)
    for final in ((), ("--final",)):
        res = migrate("export", str(volume.backing), str(dest), *final, vol=volume, check=False)
        assert res.returncode == 7 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "not a directory" in res.stderr.lower(), res.stderr
        assert list(outside.iterdir()) == []


def _retar(data: bytes, edit: Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]) -> bytes:
    """The stream ``data`` rebuilt after ``edit`` changed its list of (member, content)."""
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for m in tar:
            f = tar.extractfile(m)
            members.append((m, f.read() if f else b""))
    edit(members)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for m, content in members:
            tar.addfile(m, io.BytesIO(content) if m.isfile() else None)
    return out.getvalue()


def _as_link(kind: bytes) -> Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]:
    def edit(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        m = members[-1][0]
        m.type, m.linkname, m.size = kind, "/etc/passwd", 0
        members[-1] = (m, b"")

    return edit


def _duplicate(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    members.insert(3, members[2])


def _traversal(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    m, content = members[-1]
    m.name = "../../escaped"
    members[-1] = (m, content)


def test_crafted_stream_members_refused(
    tmp_path: Path,
    bundle: tuple[Volume, Path, dict],  # type: ignore[type-arg]
) -> None:
    """Tar tricks in the stream (a listed name as a symlink or hard link, a member twice, a
    path leaving the directory) are refused in one line; nothing lands anywhere."""
    vol, _, _ = bundle
    data = _stream(vol)
    target = tmp_path / "new-backing"
    for edit in (_as_link(tarfile.SYMTYPE), _as_link(tarfile.LNKTYPE), _duplicate, _traversal):
        res = _import_stream(_retar(data, edit), target, vol)
        assert res.returncode == 5 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not target.exists() and not (tmp_path.parent / "escaped").exists()
    assert _import_stream(_retar(data, lambda m: None), target, vol).returncode == 0
