"""`sealfs init install-units`: the units it writes are valid systemd units (systemd-analyze
verify, which works without systemd as PID 1) that order sealfs before the container runtime;
`sealfs init serve` refuses what is not a sealfs volume of the config with one line, and its
--detach-stale (the restart's ExecStartPre) clears a dead mount but never a live one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sealfs.fuse.mount import is_mounted
from tests.backing import process_gone
from tests.conftest import Volume, sealfs
from tests.unit.test_init_config import GOOD

EXPECTED = {
    "sealfs-init.service",
    "sealfs@.service",
    "sealfs.target",
    "docker.service.d/sealfs.conf",
    "containerd.service.d/sealfs.conf",
}


def _install(tmp_path: Path) -> Path:
    prefix = tmp_path / "units"
    command = tmp_path / "sealfs"  # verify wants every Exec command to exist and be executable
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    res = sealfs(
        "init", "install-units", "--prefix", str(prefix), "--sealfs", str(command),
        "--config", "/etc/sealfs/volumes.toml",
    )  # fmt: skip
    assert "systemctl enable sealfs.target" in res.stdout
    return prefix


def _unit(prefix: Path, name: str) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for line in (prefix / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            entries.setdefault(key, []).append(value)
    return entries


def test_install_units_writes_the_units(tmp_path: Path) -> None:
    prefix = _install(tmp_path)
    written = {str(p.relative_to(prefix)) for p in prefix.rglob("*") if p.is_file()}
    assert written == EXPECTED
    init = _unit(prefix, "sealfs-init.service")
    assert init["Type"] == ["oneshot"] and init["RemainAfterExit"] == ["yes"]
    assert init["ExecStart"] == [f"{tmp_path}/sealfs init up /etc/sealfs/volumes.toml"]
    assert init["ExecStop"] == [f"{tmp_path}/sealfs init down /etc/sealfs/volumes.toml"]
    assert {"docker.service", "containerd.service", "sealfs.target"} <= set(
        init["Before"][0].split()
    )
    assert "network-online.target" in init["After"][0].split()
    daemon = _unit(prefix, "sealfs@.service")
    assert daemon["Restart"] == ["on-failure"] and daemon["Type"] == ["notify"]
    assert "--detach-stale %i" in daemon["ExecStartPre"][0]
    assert "sealfs-init.service" not in daemon["After"][0]  # init up starts it: no deadlock
    assert set(daemon["Before"][0].split()) == {"sealfs-init.service", "sealfs.target"}
    assert _unit(prefix, "docker.service.d/sealfs.conf")["Requires"] == ["sealfs.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    prefix = _install(tmp_path)
    (prefix / "sealfs@data.service").symlink_to("sealfs@.service")
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "sealfs-init.service", "sealfs@data.service",
         "sealfs.target"],
        cwd=prefix, capture_output=True, text=True, check=False,
        env={"SYSTEMD_UNIT_PATH": f"{prefix}:", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
    )  # fmt: skip
    problems = [line for line in res.stderr.splitlines() if "sealfs" in line]
    assert res.returncode == 0 and not problems, res.stderr


def test_install_units_refuses_a_relative_config(tmp_path: Path) -> None:
    res = sealfs("init", "install-units", "--prefix", str(tmp_path), "--config", "v.toml",
                 "--sealfs", "/bin/true", check=False)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "sealfs: error: config 'v.toml' must be an absolute path without spaces, %, $"
    ]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("db", "volume 'db' is not of kind 'sealfs'"),
        ("other", "no volume named 'other'"),
        ("data", "Expected ']]'"),
    ],
)
def test_serve_refuses_what_is_not_a_sealfs_volume(tmp_path: Path, name: str, message: str) -> None:
    path = tmp_path / "volumes.toml"
    path.write_text(GOOD if name != "data" else "[[volume]\n")
    res = sealfs("init", "serve", name, str(path), check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], res.stderr


def _config_for(tmp_path: Path, mountpoint: Path) -> Path:
    path = tmp_path / "volumes.toml"
    path.write_text(GOOD.replace('mountpoint = "/mnt/data"', f'mountpoint = "{mountpoint}"'))
    return path


def test_detach_stale_detaches_the_mount_of_a_killed_daemon(tmp_path: Path, volume: Volume) -> None:
    """The unit's ExecStartPre right after SIGKILL: the kernel still answers stat of the root
    from its cache, but the mount is dead and must go, or the restart finds it busy."""
    volume.mount()
    os.stat(volume.mnt)  # fill the attribute cache
    pid = volume.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    for _ in range(1000):  # bounded by attempts; the kill lands in microseconds
        if process_gone(pid):
            break
        time.sleep(0.01)
    res = sealfs("init", "serve", "--detach-stale", "data", str(_config_for(tmp_path, volume.mnt)))
    assert "detached the dead mount on" in res.stderr
    assert not is_mounted(volume.mnt)


def test_detach_stale_leaves_a_live_mount_alone(tmp_path: Path, volume: Volume) -> None:
    volume.mount()
    (volume.mnt / "f").write_text("live")
    sealfs("init", "serve", "--detach-stale", "data", str(_config_for(tmp_path, volume.mnt)))
    assert (volume.mnt / "f").read_text() == "live"
