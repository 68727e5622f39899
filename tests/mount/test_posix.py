"""POSIX behaviour on real FUSE mounts of sealfs (the real CLI daemon), with and without lz4.

Most tests share one mounted volume per compression mode (module scope) and work in a fresh
directory of their own; tests that unmount, remount or kill the daemon get their own volume.
After every test the mount must still be alive and the daemon log free of unexpected errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import shutil
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Volume, new_volume

pytestmark = pytest.mark.mount

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
XATTR_CREATE = os.XATTR_CREATE
XATTR_REPLACE = os.XATTR_REPLACE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def needs_fallocate() -> None:
    import pyfuse3

    if not hasattr(pyfuse3.Operations, "fallocate"):
        pytest.skip("installed pyfuse3 has no fallocate handler (tools/pyfuse3-patches)")


def expect_errno(err: int, fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, f"expected {errno.errorcode[err]}, got {info.value!r}"


def pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking but reproducible bytes."""
    import hashlib

    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def backing_bytes(backing: Path) -> Iterator[tuple[Path, bytes]]:
    for root, _dirs, files in os.walk(backing):
        for f in files:
            p = Path(root) / f
            yield p, p.read_bytes()


def assert_no_plaintext(vol: Volume, needles: list[bytes]) -> None:
    for path, data in backing_bytes(vol.backing):
        for needle in needles:
            assert needle not in data, f"plaintext {needle!r} found in backing file {path}"
        assert all(n.decode("latin-1") not in path.name for n in needles)


def remount(vol: Volume) -> None:
    vol.umount()
    assert not os.path.ismount(vol.mnt)
    vol.mount()


def log_problems(vol: Volume) -> list[str]:
    return [
        line
        for line in vol.log_text().splitlines()
        if "Traceback" in line or "unexpected error" in line or " ERROR " in line
    ]


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["none", "lz4"])
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Volume]:
    comp = request.param
    vol = new_volume(tmp_path_factory.mktemp(f"posix-{comp}"), "--compression", comp)
    vol.mount()
    yield vol
    vol.unmount_after_test()


@pytest.fixture
def d(shared: Volume, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the shared mount; checks the mount survived the test."""
    before = len(log_problems(shared))
    path = shared.mnt / request.node.name.replace("/", "_")[:200]
    path.mkdir()
    yield path
    assert os.path.ismount(shared.mnt), "the mount went away during the test"
    new = log_problems(shared)[before:]
    assert not new, "daemon logged errors:\n" + "\n".join(new)


@pytest.fixture(params=["none", "lz4"])
def own(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Volume]:
    """A volume of its own (for remounts and daemon kills), mounted."""
    vol = new_volume(tmp_path, "--compression", request.param)
    vol.mount()
    yield vol
    if os.path.ismount(vol.mnt):
        res_ok = True
        try:
            vol.umount()
        except AssertionError:
            res_ok = False
            vol.force_unmount()
        assert res_ok, "umount failed"


# --- regular files ----------------------------------------------------------------------


def test_file_roundtrip_sizes(d: Path) -> None:
    for size in [0, 1, 4095, 4096, 4097, 131071, 131072, 131073, 3 * 131072 + 5, 2_000_000]:
        data = pattern(size, size)
        (d / f"f{size}").write_bytes(data)
        assert (d / f"f{size}").read_bytes() == data
        assert os.stat(d / f"f{size}").st_size == size
    # compressible data too (exercises lz4 on real blocks)
    text = b"sealfs compressible line\n" * 100_000
    (d / "text").write_bytes(text)
    assert (d / "text").read_bytes() == text


def test_overwrite_in_middle_and_random_io(d: Path) -> None:
    import random

    rnd = random.Random(7)
    size = 700_000
    model = bytearray(pattern(size, 1))
    p = d / "f"
    p.write_bytes(model)
    fd = os.open(p, os.O_RDWR)
    try:
        for i in range(300):
            off = rnd.randrange(0, size + 50_000)
            n = rnd.randrange(1, 20_000)
            buf = pattern(n, 1000 + i)
            assert os.pwrite(fd, buf, off) == n
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + n] = buf
            if i % 7 == 0:
                roff = rnd.randrange(0, len(model))
                assert os.pread(fd, 30_000, roff) == bytes(model[roff : roff + 30_000])
        os.fsync(fd)
    finally:
        os.close(fd)
    assert p.read_bytes() == bytes(model)


def test_excl_create_and_open_errors(d: Path) -> None:
    p = d / "x"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.close(fd)
    expect_errno(errno.EEXIST, os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect_errno(errno.ENOENT, os.open, d / "missing", os.O_RDONLY)
    expect_errno(errno.ENOTDIR, os.open, p / "sub", os.O_RDONLY)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    (d / "t").write_bytes(b"abcdef")
    fd = os.open(d / "t", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert (d / "t").read_bytes() == b""


def test_truncate_extend_no_stale_data(d: Path) -> None:
    p = d / "f"
    data = pattern(400_000, 3)
    p.write_bytes(data)
    os.truncate(p, 100_007)
    assert p.read_bytes() == data[:100_007]
    os.truncate(p, 500_000)
    got = p.read_bytes()
    assert len(got) == 500_000
    assert got[:100_007] == data[:100_007]
    assert got[100_007:] == bytes(500_000 - 100_007), "stale bytes after truncate+extend"
    # shrink to a block boundary, then past-EOF write: the gap must read as zeros
    os.truncate(p, 131072)
    with open(p, "r+b") as f:
        f.seek(300_000)
        f.write(b"END")
    got = p.read_bytes()
    assert got[:100_007] == data[:100_007]
    assert got[100_007:300_000] == bytes(300_000 - 100_007)
    assert got[300_000:] == b"END"
    # ftruncate on an open descriptor, then read through the same descriptor
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 5)
        assert os.pread(fd, 100, 0) == data[:5]
        os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == 0
        assert os.pread(fd, 100, 0) == b""
    finally:
        os.close(fd)


def test_sparse_holes_read_zeros(d: Path) -> None:
    p = d / "sparse"
    with open(p, "wb") as f:
        f.seek(10 * 1024 * 1024)
        f.write(b"tail")
        f.seek(3)
        f.write(b"head")
    assert os.stat(p).st_size == 10 * 1024 * 1024 + 4
    with open(p, "rb") as f:
        assert f.read(7) == b"\0\0\0head"
        f.seek(5 * 1024 * 1024)
        assert f.read(1024 * 1024) == bytes(1024 * 1024)
        f.seek(10 * 1024 * 1024 - 2)
        assert f.read() == b"\0\0tail"


def test_o_append(d: Path) -> None:
    p = d / "log"
    p.write_bytes(b"start\n")
    fds = [os.open(p, os.O_WRONLY | os.O_APPEND) for _ in range(4)]
    errors: list[BaseException] = []

    def writer(i: int, fd: int) -> None:
        try:
            for j in range(200):
                rec = f"writer{i} record{j:04d} ".encode() + b"x" * 40 + b"\n"
                assert os.write(fd, rec) == len(rec)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i, fd)) for i, fd in enumerate(fds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds:
        os.close(fd)
    assert not errors
    lines = p.read_bytes().split(b"\n")
    assert lines[0] == b"start" and lines[-1] == b""
    body = lines[1:-1]
    assert len(body) == 800
    assert sorted(body) == sorted(
        f"writer{i} record{j:04d} ".encode() + b"x" * 40 for i in range(4) for j in range(200)
    )
    # O_APPEND ignores the seek position
    fd = os.open(p, os.O_RDWR | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"LAST")
        assert os.pread(fd, 4, 0) == b"star"
    finally:
        os.close(fd)
    assert p.read_bytes().endswith(b"\nLAST")


def test_unlink_open_file(d: Path) -> None:
    p = d / "victim"
    data = pattern(300_000, 4)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not p.exists()
        assert "victim" not in os.listdir(d)
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"still-writable", 200_000)
        os.fsync(fd)
        assert os.pread(fd, 14, 200_000) == b"still-writable"
        # a new file with the same name is a different file
        (d / "victim").write_bytes(b"new")
        assert os.pread(fd, 3, 0) == data[:3]
    finally:
        os.close(fd)
    assert (d / "victim").read_bytes() == b"new"


# --- directories, symlinks, hard links, special files ----------------------------------


def test_directories(d: Path) -> None:
    (d / "a" / "b" / "c").mkdir(parents=True)
    assert os.stat(d / "a").st_nlink == 3
    assert os.stat(d / "a" / "b" / "c").st_nlink == 2
    expect_errno(errno.EEXIST, os.mkdir, d / "a")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d / "a")
    (d / "file").write_bytes(b"x")
    expect_errno(errno.ENOTDIR, os.rmdir, d / "file")
    expect_errno(errno.EISDIR, os.unlink, d / "a")
    expect_errno(errno.ENOTDIR, os.mkdir, d / "file" / "sub")
    names = {f"n{i}" for i in range(300)}
    for n in names:
        (d / "a" / n).write_bytes(n.encode())
    assert set(os.listdir(d / "a")) == names | {"b"}
    assert (d / "a" / "n17").read_bytes() == b"n17"
    mtime = os.stat(d / "a").st_mtime_ns
    time.sleep(0.01)
    os.unlink(d / "a" / "n17")
    assert os.stat(d / "a").st_mtime_ns > mtime
    os.rmdir(d / "a" / "b" / "c")
    assert os.stat(d / "a" / "b").st_nlink == 2
    shutil.rmtree(d / "a")
    assert os.listdir(d) == ["file"]
    assert os.stat(d / "..").st_ino == os.stat(d.parent).st_ino


def test_removed_cwd(d: Path) -> None:
    (d / "gone").mkdir()
    fd = os.open(d / "gone", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d / "gone")
        expect_errno(errno.ENOENT, os.open, "f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        expect_errno(errno.ENOENT, os.mkdir, "sub", dir_fd=fd)
    finally:
        os.close(fd)


def test_setgid_directory_inheritance(d: Path) -> None:
    os.chown(d, 0, 4321)
    os.chmod(d, 0o2775)
    (d / "f").write_bytes(b"")
    (d / "sub").mkdir()
    assert os.stat(d / "f").st_gid == 4321
    assert os.stat(d / "sub").st_gid == 4321
    assert os.stat(d / "sub").st_mode & stat.S_ISGID


def test_symlinks(d: Path) -> None:
    (d / "target").write_bytes(b"pointed-to")
    os.symlink("target", d / "rel")
    os.symlink(str(d / "target"), d / "abs")
    os.symlink("nowhere/at/all", d / "dangling")
    assert os.readlink(d / "rel") == "target"
    assert os.readlink(d / "abs") == str(d / "target")
    assert (d / "rel").read_bytes() == b"pointed-to"
    assert stat.S_ISLNK(os.lstat(d / "rel").st_mode)
    assert os.lstat(d / "rel").st_size == len("target")
    assert stat.S_ISREG(os.stat(d / "rel").st_mode)
    expect_errno(errno.ENOENT, os.stat, d / "dangling")
    assert os.readlink(d / "dangling") == "nowhere/at/all"
    os.symlink("loop2", d / "loop1")
    os.symlink("loop1", d / "loop2")
    expect_errno(errno.ELOOP, os.stat, d / "loop1")
    expect_errno(errno.EEXIST, os.symlink, "x", d / "rel")
    long_target = "t" * 4095
    os.symlink(long_target, d / "long")
    assert os.readlink(d / "long") == long_target
    expect_errno(errno.ENAMETOOLONG, os.symlink, "t" * 4096, d / "toolong")
    expect_errno(errno.EINVAL, os.readlink, d / "target")
    os.symlink("target", d / "unicode-→-ünï")
    assert os.readlink(d / "unicode-→-ünï") == "target"


def test_hard_links(d: Path) -> None:
    (d / "sub").mkdir()
    (d / "a").write_bytes(b"shared content")
    os.link(d / "a", d / "sub" / "b")
    sa, sb = os.stat(d / "a"), os.stat(d / "sub" / "b")
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 2
    with open(d / "sub" / "b", "r+b") as f:
        f.write(b"SHARED")
    assert (d / "a").read_bytes() == b"SHARED content"
    os.chmod(d / "a", 0o600)
    assert stat.S_IMODE(os.stat(d / "sub" / "b").st_mode) == 0o600
    expect_errno(errno.EEXIST, os.link, d / "a", d / "sub" / "b")
    expect_errno(errno.EPERM, os.link, d / "sub", d / "sublink")
    # rename of one hard link over another of the same inode: a no-op, both stay
    os.link(d / "a", d / "c")
    os.rename(d / "a", d / "c")
    assert (d / "a").exists() and (d / "c").exists()
    assert os.stat(d / "c").st_nlink == 3
    os.unlink(d / "a")
    assert os.stat(d / "c").st_nlink == 2
    assert (d / "sub" / "b").read_bytes() == b"SHARED content"
    os.unlink(d / "c")
    assert os.stat(d / "sub" / "b").st_nlink == 1
    # link(2) on a symlink links the symlink itself (linkat without AT_SYMLINK_FOLLOW)
    os.symlink("sub/b", d / "sl")
    os.link(d / "sl", d / "sl2", follow_symlinks=False)
    assert stat.S_ISLNK(os.lstat(d / "sl2").st_mode)
    assert os.lstat(d / "sl2").st_nlink == 2


def test_special_files(d: Path) -> None:
    os.mkfifo(d / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    os.mknod(d / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(d / "chr")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(d / "reg", 0o644 | stat.S_IFREG)
    assert stat.S_ISREG(os.stat(d / "reg").st_mode)


# --- renames ----------------------------------------------------------------------------


def test_rename_basic_and_over_existing(d: Path) -> None:
    (d / "x").mkdir()
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B" * 200_000)
    fd = os.open(d / "b", os.O_RDONLY)
    try:
        os.rename(d / "a", d / "b")  # replaces b; the open b stays readable
        assert (d / "b").read_bytes() == b"A"
        assert not (d / "a").exists()
        assert os.pread(fd, 10, 0) == b"B" * 10
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    os.rename(d / "b", d / "x" / "moved")
    assert (d / "x" / "moved").read_bytes() == b"A"
    assert sorted(os.listdir(d)) == ["x"]
    # directories
    (d / "d1" / "inner").mkdir(parents=True)
    (d / "d2").mkdir()
    os.rename(d / "d1", d / "d2")  # over an empty directory
    assert (d / "d2" / "inner").is_dir() and not (d / "d1").exists()
    (d / "d3").mkdir()
    (d / "d3" / "f").write_bytes(b"")
    expect_errno(errno.ENOTEMPTY, os.rename, d / "d2", d / "d3")
    expect_errno(errno.EISDIR, os.rename, d / "d3" / "f", d / "d2")
    expect_errno(errno.ENOTDIR, os.rename, d / "d2", d / "d3" / "f")
    expect_errno(errno.EINVAL, os.rename, d / "d2", d / "d2" / "inner" / "self")
    expect_errno(errno.ENOENT, os.rename, d / "nope", d / "nope2")
    # moving a directory updates '..' and both parents' link counts
    n_x, n_d3 = os.stat(d / "x").st_nlink, os.stat(d / "d3").st_nlink
    os.rename(d / "d2", d / "x" / "d2")
    assert os.stat(d / "x").st_nlink == n_x + 1
    assert os.stat(d).st_nlink == 4  # ., x, d3 and the entry in the parent
    assert os.stat(d / "x" / "d2" / "inner" / ".." / "..").st_ino == os.stat(d / "x").st_ino
    assert os.stat(d / "d3").st_nlink == n_d3


def test_rename_noreplace(d: Path) -> None:
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    expect_errno(errno.EEXIST, renameat2, d / "a", d / "b", RENAME_NOREPLACE)
    assert (d / "a").read_bytes() == b"A" and (d / "b").read_bytes() == b"B"
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert not (d / "a").exists() and (d / "c").read_bytes() == b"A"
    expect_errno(errno.EINVAL, renameat2, d / "c", d / "b", RENAME_NOREPLACE | RENAME_EXCHANGE)


def test_rename_exchange(d: Path) -> None:
    (d / "p1").mkdir()
    (d / "p2").mkdir()
    (d / "p1" / "f").write_bytes(b"file one")
    (d / "p2" / "g").write_bytes(b"file two")
    renameat2(d / "p1" / "f", d / "p2" / "g", RENAME_EXCHANGE)
    assert (d / "p1" / "f").read_bytes() == b"file two"
    assert (d / "p2" / "g").read_bytes() == b"file one"
    # a file and a directory across parents
    (d / "p2" / "dir").mkdir()
    (d / "p2" / "dir" / "inside").write_bytes(b"in")
    ino_dir = os.stat(d / "p2" / "dir").st_ino
    n1, n2 = os.stat(d / "p1").st_nlink, os.stat(d / "p2").st_nlink
    renameat2(d / "p1" / "f", d / "p2" / "dir", RENAME_EXCHANGE)
    assert (d / "p2" / "dir").read_bytes() == b"file two"
    assert os.stat(d / "p1" / "f").st_ino == ino_dir
    assert (d / "p1" / "f" / "inside").read_bytes() == b"in"
    assert os.stat(d / "p1" / "f" / "..").st_ino == os.stat(d / "p1").st_ino
    assert os.stat(d / "p1").st_nlink == n1 + 1
    assert os.stat(d / "p2").st_nlink == n2 - 1
    expect_errno(errno.ENOENT, renameat2, d / "p1" / "f", d / "p2" / "missing", RENAME_EXCHANGE)
    # exchanging a directory with its own descendant is refused
    (d / "p1" / "f" / "deeper").mkdir()
    expect_errno(
        errno.EINVAL, renameat2, d / "p1" / "f", d / "p1" / "f" / "deeper", RENAME_EXCHANGE
    )


# --- names and paths --------------------------------------------------------------------


def test_long_names(d: Path) -> None:
    n255 = "n" * 255
    (d / n255).write_bytes(b"ok")
    assert os.listdir(d) == [n255]
    assert (d / n255).read_bytes() == b"ok"
    utf = "é" * 127 + "x"  # 255 bytes in UTF-8
    assert len(utf.encode()) == 255
    os.mkdir(d / utf)
    os.rename(d / n255, d / utf / ("m" * 255))
    assert (d / utf / ("m" * 255)).read_bytes() == b"ok"
    os.symlink("y" * 255, d / ("s" * 255))
    assert os.readlink(d / ("s" * 255)) == "y" * 255
    n256 = "z" * 256
    expect_errno(errno.ENAMETOOLONG, os.open, d / n256, os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, d / n256)
    expect_errno(errno.ENAMETOOLONG, os.symlink, "t", d / n256)
    expect_errno(errno.ENAMETOOLONG, os.rename, d / utf, d / n256)
    expect_errno(errno.ENAMETOOLONG, os.link, d / utf / ("m" * 255), d / n256)
    expect_errno(errno.ENAMETOOLONG, os.mknod, d / n256, 0o644 | stat.S_IFREG)


def test_stat_of_256_byte_name_is_enametoolong(d: Path) -> None:
    # ext4, xfs and tmpfs answer ENAMETOOLONG for a lookup of a too-long component
    expect_errno(errno.ENAMETOOLONG, os.stat, d / ("z" * 256))


def test_deep_paths(d: Path) -> None:
    # 100 levels, addressed by absolute path (stays below PATH_MAX)
    parts = [f"l{i:02d}" for i in range(100)]
    deep = d.joinpath(*parts)
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"deep leaf")
    assert (deep / "leaf").read_bytes() == b"deep leaf"
    # moving the top into its own bottom is refused
    expect_errno(errno.EINVAL, os.rename, d / parts[0], deep / "loop")
    # 100 levels of 200-byte names: 20 KB paths, only reachable with dir fds
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    fds = [fd]
    try:
        for i in range(100):
            name = f"{i:03d}" + "w" * 197
            os.mkdir(name, dir_fd=fds[-1])
            fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        f = os.open("bottom", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fds[-1])
        os.write(f, b"bottom of a 20 KB path")
        os.close(f)
        f = os.open("bottom", os.O_RDONLY, dir_fd=fds[-1])
        assert os.read(f, 100) == b"bottom of a 20 KB path"
        os.close(f)
    finally:
        for f in fds:
            os.close(f)
    shutil.rmtree(d / ("000" + "w" * 197))
    shutil.rmtree(d / parts[0])
    assert os.listdir(d) == []


# --- fsync family -----------------------------------------------------------------------


def test_fsync_fdatasync_fsyncdir(d: Path) -> None:
    p = d / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"data" * 1000)
        os.fsync(fd)
        os.write(fd, b"more")
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert p.read_bytes() == b"data" * 1000 + b"more"


@pytest.mark.slow
@pytest.mark.parametrize("own", ["none"], indirect=True)
def test_fsynced_data_survives_sigkill(own: Volume) -> None:
    """What fsync/fdatasync/fsyncdir promised is there after the daemon is killed."""
    m = own.mnt
    with open(m / "synced", "wb") as f:
        f.write(pattern(500_000, 11))
        f.flush()
        os.fsync(f.fileno())
    with open(m / "datasynced", "wb") as f:
        f.write(b"datasync payload")
        f.flush()
        os.fdatasync(f.fileno())
    (m / "dir").mkdir()
    fd = os.open(m / "dir" / "named", os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    dfd = os.open(m / "dir", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    pid = own.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    own.force_unmount()
    own.mount()
    assert (m / "synced").read_bytes() == pattern(500_000, 11)
    assert (m / "datasynced").read_bytes() == b"datasync payload"
    assert (m / "dir" / "named").exists()
    assert stat.S_IMODE(os.stat(m / "dir" / "named").st_mode) == 0o600


# --- attributes -------------------------------------------------------------------------


def test_chmod_chown_utimens(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"x")
    for mode in (0o000, 0o777, 0o4755, 0o2711, 0o1777, 0o640):
        os.chmod(p, mode)
        assert stat.S_IMODE(os.stat(p).st_mode) == mode
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    ns_a, ns_m = 1_234_567_890_123_456_789, 987_654_321_987_654_321
    os.utime(p, ns=(ns_a, ns_m))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (ns_a, ns_m)
    ctime = st.st_ctime_ns
    time.sleep(0.01)
    os.chmod(p, 0o600)
    assert os.stat(p).st_ctime_ns > ctime
    # pre-1970 times
    os.utime(p, ns=(-1_000_000_001, -5))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (-1_000_000_001, -5)
    # on a symlink itself, and on a directory
    os.symlink("f", d / "sl")
    os.utime(d / "sl", ns=(11, 22), follow_symlinks=False)
    assert os.lstat(d / "sl").st_mtime_ns == 22
    assert os.stat(p).st_mtime_ns == -5
    os.lchown(d / "sl", 77, 88)
    assert (os.lstat(d / "sl").st_uid, os.stat(p).st_uid) == (77, 1234)
    os.utime(d, ns=(33, 44))
    assert os.stat(d).st_mtime_ns == 44
    # utime(NULL) is "now"
    before = time.time_ns()
    os.utime(p)
    assert os.stat(p).st_mtime_ns >= before - 10_000_000


# Clearing setuid/setgid and the file capability on modification (what the kernel does for a
# FUSE filesystem without FUSE_HANDLE_KILLPRIV_V2, and what sealfs would have to do itself with
# it): a write or truncate by a process without CAP_FSETID clears S_ISUID, and S_ISGID when the
# group may execute; chown clears both; any write removes security.capability.

NOBODY = 65534
VFS_CAP_V2 = struct.pack("<5I", 0x02000000 | 1, 1 << 10, 0, 0, 0)  # effective; net_bind_service


def _mode_after_nobody(p: Path, mode: int, op: Callable[[int], object]) -> int:
    """Give ``p`` ``mode``, open it for writing, apply ``op`` to the descriptor in a forked
    child running as nobody without root's capabilities (a fork: nobody may not be able to
    execute this interpreter), and return the permission bits afterwards."""
    p.write_bytes(b"data")
    os.chmod(p, mode)
    fd = os.open(p, os.O_WRONLY)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                op(fd)
                code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        os.close(fd)
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize(
    "op",
    [lambda fd: os.write(fd, b"x"), lambda fd: os.ftruncate(fd, 0)],
    ids=["write", "truncate"],
)
def test_modification_without_cap_fsetid_clears_setuid_setgid(
    d: Path, op: Callable[[int], object]
) -> None:
    assert _mode_after_nobody(d / "f", 0o6777, op) == 0o777


def test_setgid_without_group_exec_is_kept_on_write(d: Path) -> None:
    # setgid without group execute marks mandatory locking, not a privilege
    assert _mode_after_nobody(d / "f", 0o2666, lambda fd: os.write(fd, b"x")) == 0o2666


def test_root_write_keeps_setuid_and_chown_clears_it(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"data")
    os.chmod(p, 0o6755)
    with open(p, "ab") as f:
        f.write(b"more")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o6755
    os.chown(p, 1, 1)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o755


def test_write_removes_the_capability_xattr(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"data")
    os.setxattr(p, "security.capability", VFS_CAP_V2)
    assert os.getxattr(p, "security.capability") == VFS_CAP_V2
    with open(p, "ab") as f:
        f.write(b"x")
    assert "security.capability" not in os.listxattr(p)


# --- xattrs -----------------------------------------------------------------------------


def test_xattrs(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"x")
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "trusted.secret", b"\x00binary\xff")
    os.setxattr(p, "security.label", b"system_u:object_r:label")
    assert os.getxattr(p, "user.color") == b"blue"
    assert os.getxattr(p, "trusted.secret") == b"\x00binary\xff"
    assert os.getxattr(p, "security.label") == b"system_u:object_r:label"
    assert {"user.color", "trusted.secret", "security.label"} <= set(os.listxattr(p))
    expect_errno(errno.EEXIST, os.setxattr, p, "user.color", b"red", XATTR_CREATE)
    assert os.getxattr(p, "user.color") == b"blue"
    expect_errno(errno.ENODATA, os.setxattr, p, "user.none", b"v", XATTR_REPLACE)
    os.setxattr(p, "user.color", b"red", XATTR_REPLACE)
    assert os.getxattr(p, "user.color") == b"red"
    os.setxattr(p, "user.new", b"", XATTR_CREATE)
    assert os.getxattr(p, "user.new") == b""
    expect_errno(errno.ENODATA, os.getxattr, p, "user.none")
    os.removexattr(p, "user.color")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.color")
    expect_errno(errno.ENODATA, os.removexattr, p, "user.color")
    big = pattern(65536, 13)
    os.setxattr(p, "user.big", big)
    assert os.getxattr(p, "user.big") == big
    expect_errno(errno.E2BIG, os.setxattr, p, "user.huge", big + b"!")
    # on directories and on symlinks themselves
    os.setxattr(d, "user.dirattr", b"dv")
    assert os.getxattr(d, "user.dirattr") == b"dv"
    os.symlink("f", d / "sl")
    os.setxattr(d / "sl", "trusted.onlink", b"lv", follow_symlinks=False)
    assert os.getxattr(d / "sl", "trusted.onlink", follow_symlinks=False) == b"lv"
    expect_errno(errno.ENODATA, os.getxattr, p, "trusted.onlink")
    # many attributes
    for i in range(200):
        os.setxattr(p, f"user.many{i}", str(i).encode())
    assert len([n for n in os.listxattr(p) if n.startswith("user.many")]) == 200
    assert os.getxattr(p, "user.many150") == b"150"


# --- statfs -----------------------------------------------------------------------------


def test_statfs(d: Path, shared: Volume) -> None:
    st = os.statvfs(d)
    back = os.statvfs(shared.backing)
    assert st.f_namemax == 255
    assert st.f_bsize > 0 and st.f_frsize > 0
    assert st.f_blocks > 0
    assert 0 < st.f_bavail <= st.f_bfree <= st.f_blocks
    total = st.f_blocks * st.f_frsize
    assert abs(total - back.f_blocks * back.f_frsize) <= back.f_frsize * 1024
    assert shutil.disk_usage(d).free > 0


# --- mmap -------------------------------------------------------------------------------


def test_mmap_read_and_shared_write(d: Path) -> None:
    p = d / "m"
    data = pattern(300_000, 14)
    p.write_bytes(data)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:] == data
        assert mm[131_000:131_200] == data[131_000:131_200]
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[0:5] = b"HELLO"
        mm[200_000:200_006] = b"MIDDLE"
        mm[-3:] = b"END"
        mm.flush()
    got = p.read_bytes()
    assert got[:5] == b"HELLO" and got[200_000:200_006] == b"MIDDLE" and got[-3:] == b"END"
    assert got[5:200_000] == data[5:200_000]
    # a mapping sees a write(2) through another descriptor
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        with open(p, "r+b") as g:
            g.seek(10)
            g.write(b"VIAWRITE")
        assert mm[10:18] == b"VIAWRITE"


# --- fallocate --------------------------------------------------------------------------


def test_posix_fallocate_mode0(d: Path) -> None:
    needs_fallocate()
    p = d / "f"
    p.write_bytes(b"abc")
    fd = os.open(p, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 1_000_000)
        assert os.fstat(fd).st_size == 1_000_000
        assert os.pread(fd, 10, 0) == b"abc" + bytes(7)
        assert os.pread(fd, 1000, 999_000) == bytes(1000)
        fallocate(fd, 0, 2_000_000, 500)
        assert os.fstat(fd).st_size == 2_000_500
        fallocate(fd, 0, 0, 10)  # inside the file: size unchanged, data kept
        assert os.fstat(fd).st_size == 2_000_500
        assert os.pread(fd, 3, 0) == b"abc"
    finally:
        os.close(fd)
    assert os.stat(p).st_size == 2_000_500


def test_fallocate_keep_size(d: Path) -> None:
    needs_fallocate()
    p = d / "f"
    p.write_bytes(b"hello")
    fd = os.open(p, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 10_000_000)
        assert os.fstat(fd).st_size == 5
        assert os.pread(fd, 100, 0) == b"hello"
        os.pwrite(fd, b"later", 1_000_000)
        assert os.fstat(fd).st_size == 1_000_005
        assert os.pread(fd, 20, 999_990) == bytes(10) + b"later"
        expect_errno(errno.EOPNOTSUPP, fallocate, fd, 0x02 | FALLOC_FL_KEEP_SIZE, 0, 10)
    finally:
        os.close(fd)


# --- O_DIRECT ---------------------------------------------------------------------------


def test_o_direct(d: Path) -> None:
    p = d / "direct"
    size = 1 << 20
    buf = mmap.mmap(-1, size)  # page-aligned
    buf[:] = pattern(size, 16)
    fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        assert os.write(fd, buf) == size
        assert os.pwrite(fd, memoryview(buf)[:4096], 2 * size) == 4096
        back = mmap.mmap(-1, size)
        assert os.preadv(fd, [back], 0) == size
        assert back[:] == buf[:]
        back2 = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [back2], 2 * size - 4096) == 8192
        assert back2[:4096] == bytes(4096) and back2[4096:] == buf[:4096]
        os.fsync(fd)
    finally:
        os.close(fd)
    data = p.read_bytes()  # through the page cache: must agree with what O_DIRECT wrote
    assert len(data) == 2 * size + 4096
    assert data[:size] == buf[:]
    assert data[2 * size :] == buf[:4096]


def test_o_direct_and_cached_io_agree(d: Path) -> None:
    p = d / "mix"
    p.write_bytes(pattern(262144, 17))
    cached = os.open(p, os.O_RDWR)
    direct = os.open(p, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pread(cached, 10, 0) == pattern(262144, 17)[:10]  # fill the page cache
        blk = mmap.mmap(-1, 4096)
        blk[:] = b"D" * 4096
        os.pwrite(direct, blk, 4096)
        assert os.pread(cached, 4096, 4096) == b"D" * 4096
        os.pwrite(cached, b"C" * 4096, 8192)
        got = mmap.mmap(-1, 4096)
        os.preadv(direct, [got], 8192)
        assert got[:] == b"C" * 4096
    finally:
        os.close(cached)
        os.close(direct)


# --- concurrency ------------------------------------------------------------------------

REC = 4096


def _record(idx: int, gen: int) -> bytes:
    unit = idx.to_bytes(4, "little") + gen.to_bytes(4, "little")
    return unit * (REC // 8)


def _check_record(idx: int, rec: bytes, atomic: bool = True) -> int:
    """The generation in a record, or -1 for a never-written record; fails on torn data.

    Not ``atomic``: Linux does not make a buffered read atomic against a concurrent write of
    the same page, not even on ext4 (the reader may copy the page while the writer's copy into
    it is under way), so only the 8-byte units are checked: each must be one that was written
    to this record (or zeros); the highest generation seen is returned."""
    if rec == bytes(REC):
        return -1
    unit = rec[:8]
    if atomic:
        assert rec == unit * (REC // 8), f"record {idx} is torn or mixed"
    units = {rec[i : i + 8] for i in range(0, REC, 8)} - {bytes(8)}
    assert all(int.from_bytes(u[:4], "little") == idx for u in units), (
        f"record {idx} holds another record"
    )
    return max(int.from_bytes(u[4:], "little") for u in units)


def _concurrent(path: Path, direct: bool, seconds: float = 3.0) -> None:
    nrec, writers, readers = 256, 3, 3
    with open(path, "wb") as f:
        f.truncate(nrec * REC)
    stop = threading.Event()
    errors: list[BaseException] = []
    last_gen = [[-1] * nrec for _ in range(writers)]
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)

    def writer(w: int) -> None:
        import random

        rnd = random.Random(w)
        fd = os.open(path, flags)
        buf = mmap.mmap(-1, REC)
        try:
            gen = 0
            while not stop.is_set():
                # writer w owns records w, w+writers, ...
                idx = rnd.randrange(w, nrec, writers)
                gen += 1
                buf[:] = _record(idx, gen)
                assert os.pwrite(fd, buf, idx * REC) == REC
                last_gen[w][idx] = gen
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()
        finally:
            os.close(fd)

    def reader(r: int) -> None:
        fd = os.open(path, flags)
        buf = mmap.mmap(-1, 16 * REC)
        seen = [-1] * nrec
        try:
            while not stop.is_set():
                for start in range(0, nrec, 16):
                    n = os.preadv(fd, [buf], start * REC)
                    assert n == 16 * REC
                    for k in range(16):
                        idx = start + k
                        g = _check_record(idx, buf[k * REC : (k + 1) * REC], direct)
                        assert g >= seen[idx] or not direct, f"record {idx} went back in time"
                        seen[idx] = g
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(readers)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    data = path.read_bytes()
    assert len(data) == nrec * REC
    for idx in range(nrec):
        want = last_gen[idx % writers][idx]
        assert _check_record(idx, data[idx * REC : (idx + 1) * REC]) == want


@pytest.mark.slow
@pytest.mark.parametrize("direct", [False, True], ids=["cached", "odirect"])
def test_concurrent_readers_writers(d: Path, direct: bool) -> None:
    _concurrent(d / "shared", direct)


# --- large files ------------------------------------------------------------------------


def _backing_size(vol: Volume) -> int:
    """Bytes in the backing directory (superseded objects are deleted in the background, so
    a listed file may be gone by the time it is looked at)."""
    total = 0
    for p in _backing_files(vol.backing):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def _backing_files(backing: Path) -> Iterator[Path]:
    for root, _dirs, files in os.walk(backing):
        for f in files:
            yield Path(root) / f


FOUR_GIB = 4 << 30
LARGE_MARKS = {
    0: b"at zero",
    FOUR_GIB - 3: b"straddles 4 GiB",
    FOUR_GIB + 12345: pattern(300_000, 15),
    (6 << 30) + 1: b"six GiB",
}
LARGE_END = (6 << 30) + 1 + len(b"six GiB")


def _write_large(p: Path) -> None:
    with open(p, "wb") as f:
        for off, buf in LARGE_MARKS.items():
            f.seek(off)
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())


def _check_large(p: Path) -> None:
    assert os.stat(p).st_size == LARGE_END
    with open(p, "rb") as f:
        for off, buf in LARGE_MARKS.items():
            f.seek(off)
            assert f.read(len(buf)) == buf, f"data at {off:#x}"
        f.seek(2 << 30)
        assert f.read(1 << 20) == bytes(1 << 20)
        f.seek(FOUR_GIB + 12345 + 300_000)
        assert f.read(4096) == bytes(4096)


def test_large_sparse_file_over_4gib(d: Path, shared: Volume) -> None:
    before = _backing_size(shared)
    _write_large(d / "big")
    _check_large(d / "big")
    grown = _backing_size(shared) - before
    assert grown < 64 << 20, f"holes were stored: backing grew by {grown} bytes"


# --- persistence (one remount for everything) and confidentiality ----------------------

SECRET_NAME = "SEALFS_NAME_MARKER_7f3a"
SECRET_DIR = "SEALFS_DIR_MARKER_19bc"
SECRET_CONTENT = b"SEALFS_CONTENT_MARKER_c0ffee " * 5000
SECRET_TARGET = "SEALFS_SYMLINK_TARGET_MARKER_aa11"
SECRET_XVALUE = b"SEALFS_XATTR_VALUE_MARKER_5e5e"
SECRET_XNAME = "user.SEALFS_XATTR_NAME_MARKER_77"
NEEDLES = [
    SECRET_NAME.encode(),
    SECRET_DIR.encode(),
    b"SEALFS_CONTENT_MARKER",
    SECRET_TARGET.encode(),
    SECRET_XVALUE,
    SECRET_XNAME.encode(),
    b"SEALFS_SPARSE_TAIL_MARKER",
    b"SEALFS_MMAP_MARKER",
]


class Checks:
    """Run many independent checks, report every failure at the end."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, what: str, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"{what}: {type(e).__name__}: {e}")

    def done(self) -> None:
        assert not self.failures, "\n".join(self.failures)


def _populate(m: Path, ck: Checks) -> set[str]:
    """Phase 1 on a fresh volume; returns names of backing objects that must be gone later."""

    def objects() -> set[str]:
        return {p.name for p in _backing_files(m.parent / "backing" / "objects")}

    # an unlinked file that was open: its blocks must be deleted once it is closed
    base = objects()
    fd = os.open(m / "big-unlinked", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, pattern(4 << 20, 5))
    os.fsync(fd)
    doomed = objects() - base
    assert len(doomed) >= 32, f"expected >= 32 block objects, saw {len(doomed)}"
    os.unlink(m / "big-unlinked")
    assert os.pread(fd, 10, (4 << 20) - 10) == pattern(4 << 20, 5)[-10:]
    os.close(fd)

    # secrets, for the confidentiality check
    (m / SECRET_DIR).mkdir()
    (m / SECRET_DIR / SECRET_NAME).write_bytes(SECRET_CONTENT)
    os.symlink(SECRET_TARGET, m / SECRET_DIR / "link")
    os.setxattr(m / SECRET_DIR / SECRET_NAME, SECRET_XNAME, SECRET_XVALUE)
    os.setxattr(m / SECRET_DIR, "trusted.t", b"dir-trusted")
    os.link(m / SECRET_DIR / SECRET_NAME, m / "hardlink")
    with open(m / "sparse", "wb") as f:
        f.seek(5_000_000)
        f.write(b"SEALFS_SPARSE_TAIL_MARKER")

    # data to truncate/extend after the remount (blocks then come from the store)
    (m / "trunc").write_bytes(pattern(300_000, 9))
    # truncate + extend before the remount
    (m / "trunc2").write_bytes(pattern(300_000, 10))
    os.truncate(m / "trunc2", 1000)
    os.truncate(m / "trunc2", 200_000)

    # renames of all kinds
    (m / "p1").mkdir()
    (m / "p2").mkdir()
    (m / "p1" / "a").write_bytes(b"AAA")
    (m / "p2" / "b").write_bytes(b"BBB")
    (m / "p2" / "sub").mkdir()
    renameat2(m / "p1" / "a", m / "p2" / "b", RENAME_EXCHANGE)
    os.rename(m / "p2" / "sub", m / "p1" / "sub")
    (m / "over").write_bytes(b"old")
    (m / "new").write_bytes(b"new")
    os.rename(m / "new", m / "over")

    # attributes
    (m / "attrs").write_bytes(b"x")
    os.chown(m / "attrs", 1000, 2000)  # before chmod: chown clears set-user-ID
    os.chmod(m / "attrs", 0o4750)
    os.utime(m / "attrs", ns=(123_456_789_012_345_678, 876_543_210_987_654_321))
    (m / "dir700").mkdir(mode=0o700)
    os.utime(m / "dir700", ns=(5, 6))
    os.symlink("attrs", m / "sl")
    os.utime(m / "sl", ns=(7, 8), follow_symlinks=False)

    # tar/rsync pattern: write without fsync, set times, close
    fd = os.open(m / "utime-after-write", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, pattern(1_000_000, 12))
    os.utime(fd, ns=(1_000_000_000_123_456_789, 1_100_000_000_987_654_321))
    os.close(fd)
    ck(
        "mtime right after utime",
        lambda: _eq(os.stat(m / "utime-after-write").st_mtime_ns, 1_100_000_000_987_654_321),
    )

    # MAP_SHARED writes
    with open(m / "mapped", "wb") as f:
        f.truncate(1_000_000)
    with open(m / "mapped", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        for off in range(0, 1_000_000, 100_000):
            mm[off : off + 18] = b"SEALFS_MMAP_MARKER"
        mm.flush()

    # fallocate
    if hasattr(__import__("pyfuse3").Operations, "fallocate"):
        fd = os.open(m / "falloc", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"xyz")
        os.posix_fallocate(fd, 0, 300_000)
        os.close(fd)

    # a large sparse file
    _write_large(m / "large")
    return doomed


def _eq(a: object, b: object) -> None:
    assert a == b, f"{a!r} != {b!r}"


def _verify(m: Path, ck: Checks, doomed: set[str]) -> None:
    left = doomed & {p.name for p in _backing_files(m.parent / "backing" / "objects")}
    ck("blocks of the unlinked file deleted", lambda: _eq(len(left) <= 2, True))
    ck("unlinked file gone", lambda: _eq((m / "big-unlinked").exists(), False))

    sf = m / SECRET_DIR / SECRET_NAME
    ck("content", lambda: _eq(sf.read_bytes(), SECRET_CONTENT))
    ck("symlink target", lambda: _eq(os.readlink(m / SECRET_DIR / "link"), SECRET_TARGET))
    ck("xattr", lambda: _eq(os.getxattr(sf, SECRET_XNAME), SECRET_XVALUE))
    ck(
        "trusted xattr on dir",
        lambda: _eq(os.getxattr(m / SECRET_DIR, "trusted.t"), b"dir-trusted"),
    )
    ck("hard link count", lambda: _eq(os.stat(m / "hardlink").st_nlink, 2))
    ck("hard link inode", lambda: _eq(os.stat(m / "hardlink").st_ino, os.stat(sf).st_ino))

    def sparse() -> None:
        with open(m / "sparse", "rb") as f:
            _eq(f.read(100), bytes(100))
            f.seek(5_000_000)
            _eq(f.read(), b"SEALFS_SPARSE_TAIL_MARKER")

    ck("sparse file", sparse)

    def trunc() -> None:
        p = m / "trunc"
        os.truncate(p, 1000)
        os.truncate(p, 200_000)
        got = p.read_bytes()
        _eq(got[:1000], pattern(300_000, 9)[:1000])
        _eq(got[1000:], bytes(199_000))

    ck("truncate+extend after remount", trunc)

    def trunc2() -> None:
        got = (m / "trunc2").read_bytes()
        _eq(len(got), 200_000)
        _eq(got[:1000], pattern(300_000, 10)[:1000])
        _eq(got[1000:], bytes(199_000))

    ck("truncate+extend before remount", trunc2)

    def renames() -> None:
        _eq((m / "p1" / "a").read_bytes(), b"BBB")
        _eq((m / "p2" / "b").read_bytes(), b"AAA")
        _eq((m / "over").read_bytes(), b"new")
        _eq((m / "new").exists(), False)
        _eq((os.stat(m / "p1").st_nlink, os.stat(m / "p2").st_nlink), (3, 2))
        _eq(os.stat(m / "p1" / "sub" / "..").st_ino, os.stat(m / "p1").st_ino)

    ck("renames", renames)

    def attrs() -> None:
        st = os.stat(m / "attrs")
        _eq(oct(stat.S_IMODE(st.st_mode)), oct(0o4750))
        _eq((st.st_uid, st.st_gid), (1000, 2000))
        _eq((st.st_atime_ns, st.st_mtime_ns), (123_456_789_012_345_678, 876_543_210_987_654_321))
        _eq(oct(stat.S_IMODE(os.stat(m / "dir700").st_mode)), oct(0o700))
        _eq(os.stat(m / "dir700").st_mtime_ns, 6)
        _eq(os.lstat(m / "sl").st_mtime_ns, 8)

    ck("attributes", attrs)

    def utime_after_write() -> None:
        st = os.stat(m / "utime-after-write")
        _eq(st.st_size, 1_000_000)
        _eq(st.st_mtime_ns, 1_100_000_000_987_654_321)
        _eq(st.st_atime_ns, 1_000_000_000_123_456_789)
        _eq((m / "utime-after-write").read_bytes(), pattern(1_000_000, 12))

    ck("times set after an unsynced write", utime_after_write)

    def mapped() -> None:
        expected = bytearray(1_000_000)
        for off in range(0, 1_000_000, 100_000):
            expected[off : off + 18] = b"SEALFS_MMAP_MARKER"
        _eq((m / "mapped").read_bytes() == bytes(expected), True)

    ck("MAP_SHARED writes", mapped)

    if (m / "falloc").exists():
        ck("fallocate size", lambda: _eq((m / "falloc").read_bytes(), b"xyz" + bytes(300_000 - 3)))
    ck("large sparse file", lambda: _check_large(m / "large"))


@pytest.mark.slow
def test_persistence_and_no_plaintext(own: Volume) -> None:
    m = own.mnt
    ck = Checks()
    doomed = _populate(m, ck)
    os.sync()
    time.sleep(0.2)
    ck("no plaintext while mounted", lambda: assert_no_plaintext(own, NEEDLES))
    remount(own)
    _verify(m, ck, doomed)
    own.umount()
    ck("no plaintext after umount", lambda: assert_no_plaintext(own, NEEDLES))
    ck("daemon log clean", lambda: _eq(log_problems(own), []))
    ck.done()
