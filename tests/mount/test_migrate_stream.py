"""`sealfs migrate export - | sealfs migrate import -`: the byte-stream path under a hostile or
broken pipe. A real export is relayed into a real import and the pipe cut after N bytes (N
from a seeded RNG): the import refuses in one line, leaves nothing that mounts, and a rerun
with the whole stream installs the identical tree. Streams crafted to exhaust memory are
refused from their first header, with the importer's peak memory measured."""

from __future__ import annotations

import os
import pty
import random
import select
import subprocess
from pathlib import Path

import pytest

from sealfs.tarstream import BLOCK, RECORD
from tests.conftest import REPO, SEALFS, Volume, new_volume, sealfs, sealfs_measured
from tests.hostile_stream import HOSTILE, assert_refused, pax_bomb
from tests.hostile_stream import relay as cut_pipe
from tests.mount.test_migrate import snapshot, write_tree

SEED = 12
MIB = 1 << 20


def relay(vol: Volume, target: Path, limit: int | None) -> tuple[int, str, int]:
    """A real export of ``vol`` piped into a real import into ``target``, cut after
    ``limit`` bytes (see :func:`tests.hostile_stream.relay`)."""
    key = ["--key-file", str(vol.key)]
    return cut_pipe(
        [*SEALFS, "migrate", "export", str(vol.backing), "-", *key],
        [*SEALFS, "migrate", "import", "-", str(target), *key],
        limit,
        REPO,
    )


@pytest.fixture
def source(tmp_path: Path) -> tuple[Volume, dict[str, tuple[object, ...]]]:
    vol = new_volume(tmp_path, name="a")
    vol.mount()
    try:
        write_tree(vol.mnt)
        tree = snapshot(vol.mnt)
    finally:
        vol.umount()
    return vol, tree


@pytest.mark.mount
def test_cut_stream_leaves_nothing_that_mounts_and_a_rerun_installs_the_tree(
    tmp_path: Path, source: tuple[Volume, dict[str, tuple[object, ...]]]
) -> None:
    vol, tree = source
    target = tmp_path / "new-backing"
    target.mkdir()  # an empty BACKING_DIR is a fine target and must stay empty
    mnt = tmp_path / "new-mnt"
    mnt.mkdir()
    whole = subprocess.run(
        [*SEALFS, "migrate", "export", str(vol.backing), "-", "--key-file", str(vol.key)],
        capture_output=True,
        cwd=REPO,
        timeout=120,
        check=True,
    ).stdout
    # Cuts before the end marker (which starts at most two blocks and a record's padding
    # before the end; a cut in the padding after it loses nothing).
    rng = random.Random(SEED)
    cuts = sorted({BLOCK, *rng.sample(range(1, len(whole) - RECORD - 2 * BLOCK), 4)})
    for cut in cuts:
        code, err, sent = relay(vol, target, cut)
        assert sent <= cut
        assert code == 5 and len(err.strip().splitlines()) == 1, (cut, err)
        assert "cut short" in err or "ended before" in err, (cut, err)
        assert target.is_dir() and not any(target.iterdir()), cut
        assert not any(p.name.endswith("migrate-staging") for p in tmp_path.iterdir())
        refused = sealfs(
            "mount", str(target), str(mnt), "--key-file", str(vol.key), check=False, timeout=60
        )
        assert refused.returncode != 0 and not os.path.ismount(mnt), cut
    code, err, sent = relay(vol, target, None)
    assert code == 0, err
    assert sent == len(whole)
    new = Volume(target, vol.key, mnt, tmp_path / "new.log")
    new.mount()
    try:
        assert snapshot(new.mnt) == tree
    finally:
        new.umount()


def _key(tmp_path: Path) -> Path:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(64))
    key.chmod(0o600)
    return key


def test_huge_pax_header_refused_with_bounded_memory(tmp_path: Path) -> None:
    """A stream whose first member is a pax header claiming 300 MiB: refused from its
    512-byte header, without reading the claim (tarfile read it whole into memory)."""
    target = tmp_path / "new-backing"
    with pax_bomb(300 * MIB) as stream:
        res = sealfs_measured(
            "migrate",
            "import",
            "-",
            str(target),
            "--key-file",
            str(_key(tmp_path)),
            stdin=stream,
        )
    assert res.returncode == 5 and res.stderr.count("\n") == 1, res.stderr
    assert "pax header of 314572800 bytes" in res.stderr
    assert res.max_rss_mib < 100, res.max_rss_mib
    assert not target.exists()
    assert not any(p.name.endswith("migrate-staging") for p in tmp_path.iterdir())


@pytest.mark.parametrize(("stream", "message"), HOSTILE)
def test_hostile_stream_refused_in_one_line(tmp_path: Path, stream: bytes, message: str) -> None:
    target = tmp_path / "new-backing"
    argv = [*SEALFS, "migrate", "import", "-", str(target), "--key-file", str(_key(tmp_path))]
    assert_refused(argv, stream, message, REPO)
    assert not target.exists()
    assert not any(p.name.endswith("migrate-staging") for p in tmp_path.iterdir())


def test_passphrase_prompt_never_reads_the_stream(tmp_path: Path) -> None:
    """With the stream on stdin, --passphrase must ask the terminal; without one (a new
    session has no controlling terminal) it is refused before anything is read."""
    target = tmp_path / "new-backing"
    res = subprocess.run(
        [*SEALFS, "migrate", "import", "-", str(target), "--passphrase"],
        input=b"a passphrase line\n" + bytes(4 * BLOCK),
        capture_output=True,
        cwd=REPO,
        timeout=120,
        start_new_session=True,
    )
    err = res.stderr.decode()
    assert res.returncode == 2 and err.count("\n") == 1, err
    assert "--passphrase-file" in err
    assert not target.exists()


def test_passphrase_asked_on_the_terminal_while_stdin_carries_the_stream(
    tmp_path: Path,
) -> None:
    """With a controlling terminal (a pty here), --passphrase asks on it and the whole
    stream on stdin is imported."""
    phrase = b"correct horse battery staple"
    pw = tmp_path / "pw"
    pw.write_bytes(phrase + b"\n")
    pw.chmod(0o600)
    backing = tmp_path / "a"
    cheap = ("--kdf-memory", "8M", "--kdf-iterations", "1")
    sealfs("create", str(backing), "--passphrase-file", str(pw), *cheap)
    stream = tmp_path / "stream.tar"
    with open(stream, "wb") as out:
        subprocess.run(
            [*SEALFS, "migrate", "export", str(backing), "-", "--passphrase-file", str(pw)],
            stdout=out,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
            timeout=120,
            check=True,
        )
    target = tmp_path / "new-backing"
    primary, secondary = pty.openpty()
    terminal = os.ttyname(secondary)

    def take_the_terminal() -> None:  # a new session whose controlling terminal is the pty
        os.setsid()
        os.close(os.open(terminal, os.O_RDWR))

    with open(stream, "rb") as source:
        proc = subprocess.Popen(
            [*SEALFS, "migrate", "import", "-", str(target), "--passphrase"],
            stdin=source,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            preexec_fn=take_the_terminal,
        )
    seen = b""  # (the secondary stays open here too, so reads cannot fail with EIO)
    while b"Passphrase:" not in seen:
        if select.select([primary], [], [], 1.0)[0]:
            seen += os.read(primary, 1024)
        elif proc.poll() is not None:  # it ended without asking
            raise AssertionError(proc.communicate()[1].decode())
    os.write(primary, phrase + b"\n")
    out, err = proc.communicate(timeout=120)
    os.close(secondary)
    os.close(primary)
    assert proc.returncode == 0, err
    assert b"imported volume" in out
    sealfs("check", str(target), "--passphrase-file", str(pw))
