"""``sealfs luks rekey`` with real device-mapper: ext4 with data, online and interrupted.

After each rekey the volume opens with its key and holds the same files, and the header copy
saved before (with the old key, which still unwraps the old volume key from it) maps only
noise: the old volume key decrypts nothing that remains on the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sealfs.luks import profile as P
from sealfs.luks.firstboot import VolumeSpec, bring_down, bring_up
from sealfs.luks.keys import KeyBinding, KeyFileSource
from sealfs.luks.rekey import read_rekey_state
from sealfs.luks.volume import header_backup

from ..conftest import REPO, new_image, reencrypt_killed_after_progress, write_key
from .conftest import HAVE_DM, SKIP_REASON, cleanup_mapping, drop_caches

if not HAVE_DM:
    pytest.skip(SKIP_REASON, allow_module_level=True)

#: 16 MiB header region + 8 MiB data: enough for ext4 and files, short under emulation.
IMAGE = 24 * 1024 * 1024
BINDING = KeyBinding("vm-tests", "rekey")


def _up(tmp_path: Path, name: str, names: list[str]) -> tuple[VolumeSpec, KeyFileSource, str]:
    """A formatted, mounted volume holding two files; returns the SHA-256 of their contents."""
    img = new_image(tmp_path / f"{name}.img", IMAGE)
    keys = KeyFileSource(str(write_key(tmp_path / "key", os.urandom(32))))
    mnt = tmp_path / "mnt"
    spec = VolumeSpec(str(img), name, BINDING, mountpoint=str(mnt))
    names.append(name)
    assert bring_up(spec, keys).steps[-1] == "ready"
    (mnt / "a").write_bytes(os.urandom(3 * 1024 * 1024))
    (mnt / "b").write_bytes(b"sealfs rekey test\n" * 1000)
    os.sync()
    return spec, keys, _digest(mnt)


def _digest(mnt: Path) -> str:
    h = hashlib.sha256()
    for name in ("a", "b"):
        h.update((mnt / name).read_bytes())
    return h.hexdigest()


def _rekey(spec: VolumeSpec, keys: KeyFileSource, *extra: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "sealfs", "luks", "rekey", spec.device, "--key-file", keys.path,
         "--json", *extra],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
        timeout=600, check=False,
    )  # fmt: skip


def _check_reopened(spec: VolumeSpec, keys: KeyFileSource, digest: str, old_header: Path) -> None:
    """Same files through the new key; the old header + old key map no file system."""
    drop_caches()
    assert bring_up(spec, keys).steps == ["opened", "mounted"]
    assert _digest(Path(str(spec.mountpoint))) == digest
    bring_down(spec.name)
    stale = f"{spec.name}-old"
    subprocess.run(
        ["cryptsetup", "open", "--readonly", "--header", str(old_header), "--key-file",
         keys.path, spec.device, stale],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        with open(f"/dev/mapper/{stale}", "rb") as f:
            head = f.read(2 * 1024 * 1024)
        # ext4's superblock magic at 1080: the old key turns every sector into noise.
        assert head[1080:1082] != b"\x53\xef"
        probe = subprocess.run(["blkid", "-p", f"/dev/mapper/{stale}"], capture_output=True)
        assert b"ext4" not in probe.stdout
    finally:
        cleanup_mapping(stale)


def test_online_rekey_of_a_mounted_volume(tmp_path: Path, mapping_names: list[str]) -> None:
    spec, keys, digest = _up(tmp_path, "rkon", mapping_names)
    backup = tmp_path / "old-header"
    header_backup(spec.device, str(backup), spec.profile)
    res = _rekey(spec, keys)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["online"] == "rkon" and out["steps"][-1] == "slots rewritten"
    # The file system stayed mounted and usable throughout.
    assert _digest(Path(str(spec.mountpoint))) == digest
    (Path(str(spec.mountpoint)) / "c").write_bytes(b"written after the rekey")
    os.sync()
    bring_down(spec.name)
    _check_reopened(spec, keys, digest, backup)


def test_rekey_killed_mid_reencryption_resumes(tmp_path: Path, mapping_names: list[str]) -> None:
    """cryptsetup reencrypt, as the rekey runs it but with 4 KiB hotzones, SIGKILLed after its
    first progress report; `sealfs luks rekey` again finishes it (cryptsetup's resume)."""
    spec, keys, digest = _up(tmp_path, "rkoff", mapping_names)
    bring_down(spec.name)
    backup = tmp_path / "old-header"
    header_backup(spec.device, str(backup), spec.profile)
    crashed = _rekey(spec, keys, env={"SEALFS_FAILPOINT": "luks:rekey-staged"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    reencrypt_killed_after_progress(spec.device, keys.path, "--force-offline-reencrypt")
    assert read_rekey_state(spec.device, P.LuksProfile()).reencrypting
    with pytest.raises(Exception, match="LUKS header refused"):
        bring_up(spec, keys)  # nothing but the rekey opens a half re-encrypted volume
    res = _rekey(spec, keys)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["resumed"] and out["steps"][-2:] == ["re-encrypted", "slots rewritten"]
    assert out["steps"][:-2] in ([], ["recovered"])  # "recovered": killed inside a hotzone
    _check_reopened(spec, keys, digest, backup)
