"""Real applications on a real sealfs mount: SQLite (WAL), git, tar, rsync."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Volume, new_volume

pytestmark = pytest.mark.mount


@pytest.fixture(params=["none", "lz4"])
def vol(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Volume]:
    v = new_volume(tmp_path, "--compression", request.param)
    v.mount()
    yield v
    v.unmount_after_test()


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert res.returncode == 0, (
        f"{' '.join(map(str, args))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    )
    return res.stdout


def clean_log(v: Volume) -> None:
    bad = [line for line in v.log_text().splitlines() if "Traceback" in line or " ERROR " in line]
    assert not bad, "\n".join(bad)


def make_tree(root: Path) -> None:
    """A source tree with the things archivers care about."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for i in range(50):
        (root / "dir" / f"file{i}.txt").write_text(f"file {i}\n" * (i * 37 + 1))
    (root / "dir" / "sub" / "binary").write_bytes(
        b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(40_000))
    )
    with open(root / "sparse", "wb") as f:
        f.seek(20 << 20)
        f.write(b"end of sparse file")
    os.symlink("dir/file1.txt", root / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.link(root / "dir" / "file2.txt", root / "hardlink")
    os.chmod(root / "dir" / "file3.txt", 0o600)
    os.chmod(root / "dir" / "sub", 0o750)
    os.utime(root / "dir" / "file4.txt", ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
    os.setxattr(root / "dir" / "file5.txt", "user.tag", b"tagged")
    os.mkfifo(root / "fifo")


def tree_digest(root: Path) -> dict[str, tuple]:
    """Everything that should survive a copy: type, mode, size, content, target, mtime,
    hard-link grouping and user xattrs."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(kind):
                extra = hashlib.sha256(p.read_bytes()).hexdigest()
                group = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None
                extra = (extra, group)
            elif stat.S_ISLNK(kind):
                extra = os.readlink(p)
            xattrs = ()
            if not stat.S_ISLNK(kind):
                xattrs = tuple(
                    sorted((n, os.getxattr(p, n)) for n in os.listxattr(p) if n.startswith("user."))
                )
            mtime = st.st_mtime_ns if not stat.S_ISDIR(kind) else None
            out[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_size if not stat.S_ISDIR(kind) else None,
                extra,
                mtime,
                xattrs,
            )
    return out


# --- SQLite ------------------------------------------------------------------------------


def test_sqlite_wal(vol: Volume) -> None:
    db = vol.mnt / "app.db"
    con = sqlite3.connect(db, isolation_level=None)
    try:
        assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB)")
        con.execute("CREATE INDEX tv ON t(v)")
        for i in range(3000):
            con.execute("BEGIN")
            con.execute("INSERT INTO t (k, v) VALUES (?, ?)", (f"key{i}", os.urandom(200)))
            if i % 3 == 0:
                con.execute("UPDATE t SET v = ? WHERE id = ?", (os.urandom(300), i // 2 + 1))
            if i % 10 == 0:
                con.execute("DELETE FROM t WHERE id = ?", (i // 3 + 1,))
            con.execute("COMMIT")
        con.execute("PRAGMA synchronous=FULL")
        for i in range(100):  # every commit fsyncs the WAL
            con.execute("INSERT INTO t (k, v) VALUES (?, ?)", (f"full{i}", b"x"))
        # a second connection reads concurrently through the shared memory index (-shm, mmap)
        con2 = sqlite3.connect(db)
        count = con2.execute("SELECT count(*) FROM t").fetchone()[0]
        assert count == con.execute("SELECT count(*) FROM t").fetchone()[0]
        con2.close()
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.execute("VACUUM")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        digest = hashlib.sha256(
            b"".join(
                r[0] + r[1]
                for r in con.execute("SELECT k, hex(v) FROM t ORDER BY id").fetchall()
                for r in [(r[0].encode(), r[1].encode())]
            )
        ).hexdigest()
    finally:
        con.close()
    vol.umount()
    vol.mount()
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == count
        again = hashlib.sha256(
            b"".join(
                r[0] + r[1]
                for r in con.execute("SELECT k, hex(v) FROM t ORDER BY id").fetchall()
                for r in [(r[0].encode(), r[1].encode())]
            )
        ).hexdigest()
        assert again == digest
    finally:
        con.close()
    clean_log(vol)


# --- git ---------------------------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git(vol: Volume) -> None:
    repo = vol.mnt / "repo"
    repo.mkdir()
    run("git", "init", "-q", "-b", "main", repo, env=GIT_ENV)
    make_tree(repo)
    os.unlink(repo / "fifo")  # git does not track fifos
    run("git", "add", "-A", cwd=repo, env=GIT_ENV)
    run("git", "commit", "-q", "-m", "first", cwd=repo, env=GIT_ENV)
    for i in range(5):
        (repo / "dir" / f"file{i}.txt").write_text(f"changed {i}\n")
        (repo / f"new{i}").write_text("new\n" * i)
        run("git", "add", "-A", cwd=repo, env=GIT_ENV)
        run("git", "commit", "-q", "-m", f"change {i}", cwd=repo, env=GIT_ENV)
    run("git", "gc", "-q", "--aggressive", "--prune=now", cwd=repo, env=GIT_ENV)
    run("git", "fsck", "--full", "--strict", cwd=repo, env=GIT_ENV)
    # a local clone hard-links the object files
    run("git", "clone", "-q", repo, vol.mnt / "clone", env=GIT_ENV)
    run("git", "fsck", "--full", cwd=vol.mnt / "clone", env=GIT_ENV)
    head = run("git", "rev-parse", "HEAD", cwd=repo, env=GIT_ENV)
    assert run("git", "status", "--porcelain", cwd=repo, env=GIT_ENV) == ""
    vol.umount()
    vol.mount()
    run("git", "fsck", "--full", "--strict", cwd=repo, env=GIT_ENV)
    assert run("git", "rev-parse", "HEAD", cwd=vol.mnt / "clone", env=GIT_ENV) == head
    assert run("git", "status", "--porcelain", cwd=repo, env=GIT_ENV) == ""
    assert run("git", "log", "--oneline", cwd=repo, env=GIT_ENV).count("\n") == 6
    clean_log(vol)


# --- tar ---------------------------------------------------------------------------------


def test_tar(vol: Volume, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    archive = tmp_path / "src.tar"
    run("tar", "--xattrs", "--sparse", "-cf", archive, "-C", src, ".")
    dest = vol.mnt / "extracted"
    dest.mkdir()
    run("tar", "--xattrs", "--xattrs-include=user.*", "-xpf", archive, "-C", dest)
    run("tar", "--xattrs", "-df", archive, "-C", dest)  # tar's own compare
    assert tree_digest(dest) == tree_digest(src)
    # and the other way: archive from the mount, extract elsewhere
    archive2 = tmp_path / "from-mount.tar"
    run("tar", "--xattrs", "--sparse", "-cf", archive2, "-C", dest, ".")
    out = tmp_path / "out"
    out.mkdir()
    run("tar", "--xattrs", "--xattrs-include=user.*", "-xpf", archive2, "-C", out)
    assert tree_digest(out) == tree_digest(src)
    vol.umount()
    vol.mount()
    assert tree_digest(dest) == tree_digest(src)
    run("tar", "--xattrs", "-df", archive, "-C", dest)
    clean_log(vol)


# --- rsync -------------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("rsync") is None,
    reason="rsync is not installed (add it to APT_PACKAGES in the Makefile)",
)
def test_rsync(vol: Volume, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    # rsync leaves a new symlink's or fifo's time alone when it equals the source's at
    # one-second granularity (seen on plain ext4 too); old times make it set them.
    for name in ("link", "dangling", "fifo"):
        os.utime(src / name, ns=(1_400_000_000_123_456_789,) * 2, follow_symlinks=False)
    dest = vol.mnt / "copy"
    flags = ["-aHAXS", "--numeric-ids"]
    run("rsync", *flags, f"{src}/", f"{dest}/")
    assert tree_digest(dest) == tree_digest(src)
    # incremental update: changed, new and deleted files; --inplace and default (temp+rename)
    (src / "dir" / "file7.txt").write_text("changed\n")
    (src / "brand-new").write_bytes(os.urandom(100_000))
    os.unlink(src / "dir" / "file8.txt")
    run("rsync", *flags, "--delete", f"{src}/", f"{dest}/")
    (src / "dir" / "sub" / "binary").write_bytes(b"rewritten in place" * 1000)
    run("rsync", *flags, "--inplace", "--delete", f"{src}/", f"{dest}/")
    assert tree_digest(dest) == tree_digest(src)
    vol.umount()
    vol.mount()
    assert tree_digest(dest) == tree_digest(src)
    # nothing to transfer on a second run: rsync saw sizes and mtimes it wrote
    out = run("rsync", *flags, "--delete", "-i", f"{src}/", f"{dest}/")
    assert out.strip() == "", f"rsync wanted to transfer again:\n{out}"
    clean_log(vol)
