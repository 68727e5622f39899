"""`sealfs migrate` interrupted and rerun, through a real KMS on 127.0.0.1 and real FUSE.

An export or import killed at a seeded point (SIGKILL once the bundle or staging directory
holds K object files, with a directory planted at a later object's name as a brake, so the run
cannot finish first however fast the machine is), or stopped by a full disk, continues when
rerun: it keeps the copies it can verify, copies the rest, and the imported volume mounts with
the tree the old one had. A writer that keeps writing during the live pre-copy passes is moved
intact by the final pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, SEALFS, Volume, sealfs
from tests.mount.test_migrate import snapshot, write_tree

from .conftest import KmsProcess, wait_for
from .test_volume_anchor import kmount, kms_args, kvol  # noqa: F401 - fixture

pytestmark = pytest.mark.mount

MANIFEST = "sealfs-migrate.manifest"


def _fill(mnt: Path, rng: random.Random, files: int = 24) -> None:
    """The usual tree (hard links, xattrs, sparse file, symlink) and enough incompressible
    files that the volume has objects in many fan-out directories."""
    write_tree(mnt)
    (mnt / "data").mkdir()
    for i in range(files):
        (mnt / "data" / f"f{i:02d}").write_bytes(rng.randbytes(rng.randint(20_000, 200_000)))


def _copies(root: Path) -> set[str]:
    """The whole copies (no ``.part``) of files under ``root``, relative to it."""
    if not root.is_dir():
        return set()
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not p.name.endswith(".part") and p.is_file() and not p.is_symlink()
    }


def _objects(root: Path) -> list[str]:
    return sorted(n for n in _copies(root) if n.startswith("objects/"))


def _listed(bundle: Path) -> set[str]:
    return {f[0] for f in json.loads((bundle / MANIFEST).read_text())["manifest"]["files"]}


def _kill_point(rng: random.Random, names: list[str]) -> tuple[int, str]:
    """K (how many object copies to wait for) and the brake: the last object in sorted order,
    which every pass reaches after all objects of the other fan-out directories."""
    brake = names[-1]
    before = sum(not n.startswith(brake.rsplit("/", 1)[0] + "/") for n in names)
    assert before >= 2, names
    return rng.randint(1, before - 1), brake


def _interrupt(args: list[str], watch: Path, k: int) -> subprocess.CompletedProcess[str]:
    """Run ``sealfs *args`` and SIGKILL it once ``watch`` holds ``k`` object copies (or let
    it fail at the brake first)."""
    proc = subprocess.Popen(
        [*SEALFS, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    while proc.poll() is None and len(_objects(watch)) < k:
        time.sleep(0.002)  # polling the filesystem: the kill point is K files, not a time
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run finished despite the brake"
    assert proc.returncode == -9 or (proc.returncode == 7 and "Is a directory" in err), err
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _migrate(kms: KmsProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sealfs("migrate", *args, *kms_args(kms), check=check)


def _moved(tmp_path: Path, key: Path, name: str = "new") -> Volume:
    vol = Volume(tmp_path / f"{name}-backing", key, tmp_path / f"{name}-mnt", tmp_path / "n.log")
    vol.mnt.mkdir()
    return vol


def _assert_mounts_as(vol: Volume, kms: KmsProcess, tree: dict[str, tuple[object, ...]]) -> None:
    kmount(vol, kms)
    try:
        assert snapshot(vol.mnt) == tree
    finally:
        vol.umount()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_export_and_import_resume(
    tmp_path: Path,
    kvol: Volume,  # noqa: F811 - fixture
    kms: KmsProcess,
    seed: int,
) -> None:
    rng = random.Random(seed)
    kmount(kvol, kms)
    _fill(kvol.mnt, rng)
    tree = snapshot(kvol.mnt)
    kvol.umount()

    # export: a live pass (odd seeds) or a first final pass (even seeds) killed at K copies
    dest = tmp_path / "bundle"
    k, brake = _kill_point(rng, _objects(kvol.backing))
    (dest / brake).mkdir(parents=True)
    final = ("--final",) if seed % 2 == 0 else ()
    _interrupt(["migrate", "export", str(kvol.backing), str(dest), *final, *kms_args(kms)], dest, k)
    assert not (dest / MANIFEST).exists()
    (dest / brake).rmdir()
    left = set(_objects(dest))
    assert len(left) >= k
    # copies no ledger vouches for that are wrong: one cut short, one altered; a stale .part
    damaged = rng.sample(sorted(left), min(2, len(left) - 1))
    for n, name in enumerate(damaged):
        data = bytearray((dest / name).read_bytes())
        data[-1] ^= 1
        (dest / name).write_bytes(bytes(data[:-1] if n == 0 else data))
    stale = dest / sorted(left)[0]
    stale.with_name(f".{stale.name}.part").write_bytes(b"half a copy")
    out = json.loads(
        _migrate(kms, "export", str(kvol.backing), str(dest), "--final", "--json").stdout
    )
    reusable = (left - set(damaged)) & _listed(dest)
    assert reusable and out["files_reused"] == len(reusable), out  # re-hashed, not recopied
    assert out["bytes_copied"] < out["bytes_total"], out
    assert not [n for n in dest.rglob("*") if n.name.endswith(".part")]

    # import: killed at K staged copies; then the host meddles with the staging directory
    new = _moved(tmp_path, kvol.key)
    stage = tmp_path / f".{new.backing.name}.migrate-staging"
    k, brake = _kill_point(rng, sorted(n for n in _listed(dest) if n.startswith("objects/")))
    (stage / brake).mkdir(parents=True)
    _interrupt(["migrate", "import", str(dest), str(new.backing), *kms_args(kms)], stage, k)
    assert not new.backing.exists()
    (stage / brake).rmdir()
    staged = _copies(stage) & _listed(dest)
    assert len(staged) >= k
    damaged = sorted(staged)[rng.randrange(len(staged))]
    data = bytearray((stage / damaged).read_bytes())
    data[rng.randrange(len(data))] ^= 0x40
    (stage / damaged).write_bytes(bytes(data))  # a staged copy that no longer matches
    (stage / "stray").write_text("not in any manifest")
    (stage / "objects" / "link").symlink_to("/etc/hostname")
    out = json.loads(_migrate(kms, "import", str(dest), str(new.backing), "--json").stdout)
    assert out["files_reused"] == len(staged) - 1, out  # all but the damaged one
    assert out["bytes_copied"] < out["bytes_total"], out
    assert not stage.exists()
    assert _copies(new.backing) >= _listed(dest)
    assert not (new.backing / "stray").exists() and not (new.backing / "objects" / "link").exists()
    _assert_mounts_as(new, kms, tree)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (the test runs as root), unmounted afterwards."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def _refused_for_space(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 7, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "No space left on device" in res.stderr and "run again" in res.stderr, res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_then_rerun(
    tmp_path: Path,
    kvol: Volume,  # noqa: F811 - fixture
    kms: KmsProcess,
) -> None:
    """Export into and import onto a tmpfs too small for the volume: one line, exit 7,
    nothing installed and no half-written file left; with room made, the rerun completes
    and keeps what the first run copied."""
    kmount(kvol, kms)
    _fill(kvol.mnt, random.Random(7), files=12)
    tree = snapshot(kvol.mnt)
    kvol.umount()
    new = _moved(tmp_path, kvol.key)
    with _tmpfs(tmp_path / "out", "1m") as out_fs, _tmpfs(tmp_path / "in", "1m") as in_fs:
        dest = out_fs / "bundle"
        _refused_for_space(
            _migrate(kms, "export", str(kvol.backing), str(dest), "--final", check=False)
        )
        assert _objects(dest) and not (dest / MANIFEST).exists()
        assert not [n for n in dest.rglob("*") if n.name.endswith(".part")]
        _grow(out_fs, "64m")
        out = json.loads(
            _migrate(kms, "export", str(kvol.backing), str(dest), "--final", "--json").stdout
        )
        assert out["files_reused"] > 0 and out["bytes_copied"] < out["bytes_total"], out

        new.backing = in_fs / "backing"
        stage = in_fs / ".backing.migrate-staging"
        _refused_for_space(_migrate(kms, "import", str(dest), str(new.backing), check=False))
        assert not new.backing.exists() and _copies(stage)
        assert not [n for n in stage.rglob("*") if n.name.endswith(".part")]
        _grow(in_fs, "64m")
        out = json.loads(_migrate(kms, "import", str(dest), str(new.backing), "--json").stdout)
        assert out["files_reused"] > 0 and out["bytes_copied"] < out["bytes_total"], out
        try:
            _assert_mounts_as(new, kms, tree)
        finally:
            new.force_unmount()


class Writer(threading.Thread):
    """Keeps rewriting, chmod-ing, tagging and deleting files in a mounted volume (each write
    fsynced) and remembers what it last left in each: what the moved volume must hold. Each
    round also leaves a file it never touches again, closed without fsync (so its blocks are
    written back as object files, not carried in the journal, and are never superseded): a
    pass that follows a round always has an object to copy, whatever the timing."""

    def __init__(self, root: Path, seed: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.rng = random.Random(seed)
        self.rounds = 0
        self.model: dict[str, tuple[bytes, int, bytes]] = {}
        self.error: BaseException | None = None
        self._stop_now = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_now.is_set():
                self._round()
                self.rounds += 1
        except BaseException as e:  # reported by stop()
            self.error = e

    def _round(self) -> None:
        kept = self.root / "kept"
        kept.mkdir(exist_ok=True)
        (kept / f"r{self.rounds:05d}").write_bytes(self.rng.randbytes(200_000))
        name = f"w{self.rng.randrange(12):02d}"
        path = self.root / name
        if name in self.model and self.rng.random() < 0.15:
            path.unlink()
            del self.model[name]
            return
        data = self.rng.randbytes(self.rng.randint(1, 150_000))
        mode = self.rng.choice([0o600, 0o640, 0o644, 0o755])
        tag = f"round {self.rounds}".encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
            os.setxattr(fd, "user.round", tag)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.model[name] = (data, mode, tag)

    def stop(self) -> None:
        self._stop_now.set()
        self.join(timeout=120)
        if self.error is not None:
            raise self.error


def _assert_holds(root: Path, model: dict[str, tuple[bytes, int, bytes]]) -> None:
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("w")) == sorted(model)
    for name, (data, mode, tag) in model.items():
        assert (root / name).read_bytes() == data, name
        assert (root / name).stat().st_mode & 0o7777 == mode, name
        assert os.getxattr(root / name, "user.round") == tag, name


def _object_files(root: Path) -> set[str]:
    """The object file names under ``root/objects`` (none if it does not exist yet)."""
    objects = root / "objects"
    return {
        f"{d}/{f}"
        for d in (os.listdir(objects) if objects.is_dir() else ())
        for f in os.listdir(objects / d)
        if not f.startswith(".")
    }


@pytest.mark.slow
def test_live_precopy_while_a_writer_runs(
    tmp_path: Path,
    kvol: Volume,  # noqa: F811 - fixture
    kms: KmsProcess,
) -> None:
    """Live passes run while a writer keeps writing; each pass waits for more writes and for
    an object file the bundle lacks (events, not time), so each copies new objects. After the
    writer stops, `--final --umount` and an import on a second backing directory give exactly
    what it last wrote."""
    kmount(kvol, kms)
    writer = Writer(kvol.mnt, seed=11)
    writer.start()
    dest = tmp_path / "bundle"
    try:
        for n in range(3):
            passed = writer.rounds
            wait_for(
                lambda passed=passed: (
                    writer.rounds >= passed + 3
                    and bool(_object_files(kvol.backing) - _object_files(dest))
                ),
                "the writer's rounds and an object the bundle lacks",
            )
            out = json.loads(_migrate(kms, "export", str(kvol.backing), str(dest), "--json").stdout)
            assert out["objects_copied"] > 0, (n, out)
    finally:
        writer.stop()
    tree = snapshot(kvol.mnt)
    _assert_holds(kvol.mnt, writer.model)
    _migrate(kms, "export", str(kvol.backing), str(dest), "--final", "--umount", str(kvol.mnt))
    new = _moved(tmp_path, kvol.key)
    _migrate(kms, "import", str(dest), str(new.backing))
    kmount(new, kms)
    try:
        assert snapshot(new.mnt) == tree
        _assert_holds(new.mnt, writer.model)
    finally:
        new.umount()
