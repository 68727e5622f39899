"""A real boot: systemd as PID 1 brings the volumes up with sealfs-init.service, data survives
a reboot, and a SIGKILLed FUSE daemon is restarted by systemd with its committed data intact.

tools/vm/boot.sh boots Debian's kernel under TCG on this machine's own root (read-only over
9p, a tmpfs overlay on top: every boot starts clean, like a CVM's root). The test writes into
the overlay the volume list (one sealfs volume backed on /dev/vda, one LUKS volume on
/dev/vdb, the KMS on this host at 10.0.2.2 with its key pinned, a simulated attester), the
units of `sealfs init install-units`, masks for what would slow the boot, and a service that
runs guest.sh after sealfs.target: it reports over the shared directory, writes, reboots,
reads back, kills the daemon and waits for systemd to restart it, then powers off.

Slow (minutes): runs only with SEALFS_VM_BOOT=1 (`make vm-test`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealfs.cli.credentials import DEV_COMPOSE_HASH
from tests.conftest import REPO, sealfs
from tests.kms.conftest import KmsProcess, make_state, sim_policy, start_kms

pytestmark = pytest.mark.skipif(
    os.environ.get("SEALFS_VM_BOOT") != "1", reason="boots a VM for minutes: make vm-test"
)

BOOT_TIMEOUT = 1500
APP_ID = bytes.fromhex("c3" * 20)
#: Units of this machine that would slow or hang a boot in the VM (no tty, no database, no
#: timers), and the container marker a containerised host would leak into it.
MASKED = (
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "postgresql.service",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "systemd-tmpfiles-setup.service",  # walks the whole 9p root: minutes under TCG
    "systemd-tmpfiles-clean.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "e2scrub_reap.service",
    "timers.target",
    "systemd-networkd-wait-online.service",  # the network is configured before systemd
)

TEST_SERVICE = """\
[Unit]
Description=sealfs VM boot test (guest side)
Wants=sealfs.target
After=sealfs.target

[Service]
Type=oneshot
ExecStart=/bin/bash /sealfs-vm/guest.sh
StandardOutput=append:/sealfs-vm/guest.log
StandardError=inherit
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""

GUEST = r"""#!/bin/bash
# Runs in the VM after sealfs.target, once per boot; results go to /sealfs-vm/<boot>.txt.
set -u
R=/sealfs-vm
phase=boot1
[ -f "$R/boot1.txt" ] && phase=boot2
say() { echo "$1=$2" >>"$R/$phase.txt"; }
unit() { systemctl show -p "$2" --value "$1"; }
say pid1 "$(cat /proc/1/comm)"
say init_result "$(unit sealfs-init.service Result)"
say target "$(systemctl is-active sealfs.target)"
say data_unit "$(systemctl is-active sealfs@data.service)"
say db_mounted "$(mountpoint -q /mnt/db && echo yes || echo no)"
token="$(cat "$R/token")"
if [ "$phase" = boot1 ]; then
    echo "$token" >/mnt/data/hello && sync /mnt/data/hello && say data_write ok
    mountpoint -q /mnt/db && echo "$token" >/mnt/db/hello && sync /mnt/db/hello && say db_write ok
    journalctl -b -o short-monotonic --no-pager >"$R/boot1-journal.log" 2>&1
    say done yes
    systemctl reboot
    exit 0
fi
say data_read "$(cat /mnt/data/hello 2>&1)"
say db_read "$(cat /mnt/db/hello 2>&1)"
pid="$(unit sealfs@data.service MainPID)"
say daemon_before "$pid"
kill -9 "$pid"
# Wait for the event (a new main process, ready again), bounded by attempts, not by a rate.
new=0
for _ in $(seq 900); do
    new="$(unit sealfs@data.service MainPID)"
    if [ "$new" != 0 ] && [ "$new" != "$pid" ] &&
        [ "$(systemctl is-active sealfs@data.service)" = active ]; then
        break
    fi
    sleep 1
done
say daemon_after "$new"
say restarts "$(unit sealfs@data.service NRestarts)"
say data_after_restart "$(cat /mnt/data/hello 2>&1)"
journalctl -b -o short-monotonic --no-pager >"$R/boot2-journal.log" 2>&1
say done yes
systemctl poweroff
"""


@dataclass
class Boot:
    returncode: int
    output: str
    work: Path
    token: str

    def phase(self, name: str) -> dict[str, str]:
        path = self.work / f"{name}.txt"
        if not path.exists():
            pytest.fail(f"the VM did not report {name} (exit {self.returncode}):\n{self.tail()}")
        return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)

    def tail(self) -> str:
        console = self.work / "console.log"
        text = console.read_text(errors="replace") if console.exists() else ""
        return self.output + "\n".join(text.splitlines()[-40:])


def _why_not() -> str | None:
    for tool, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("mkfs.ext4", "e2fsprogs"),
        ("cryptsetup", "cryptsetup-bin"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install {package})"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is not installed on this machine (its root is the VM's)"
    return None


def _disk(path: Path, mib: int, ext4: bool) -> Path:
    with path.open("wb") as f:
        f.truncate(mib << 20)
    if ext4:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    return path


def _config(kms: KmsProcess) -> str:
    return f"""\
[kms]
urls = ["http://10.0.2.2:{kms.port}"]
public_keys = ["{kms.public_key.hex()}"]
app_id = "{APP_ID.hex()}"
attester = "simulated"
deadline = 120
event_log = "/run/log/sealfs/runtime_events.log"

[[volume]]
name = "data"
kind = "sealfs"
backing = "/var/lib/sealfs/data"
mountpoint = "/mnt/data"
create = "first-boot"
compression = "none"
owner = "0:0"
mode = "0750"

[[volume]]
name = "db"
kind = "luks"
device = "/dev/vdb"
mountpoint = "/mnt/db"
filesystem = "ext4"
integrity = false
create = "first-boot"
"""


def _overlay(root: Path, kms: KmsProcess) -> None:
    """What every boot adds to the host's root: config, units, masks, mounts, the test."""
    etc = root / "etc"
    units = etc / "systemd" / "system"
    units.mkdir(parents=True)
    for name in MASKED:
        (units / name).symlink_to("/dev/null")
    (units / "default.target").symlink_to("/lib/systemd/system/multi-user.target")
    command = root / "usr" / "local" / "bin" / "sealfs"
    command.parent.mkdir(parents=True)
    command.write_text(
        "#!/bin/sh\nexport PYTHONPATH=" + str(REPO) + " PYTHONDONTWRITEBYTECODE=1\n"
        f'exec {sys.executable} -m sealfs "$@"\n'
    )
    command.chmod(0o755)
    sealfs(
        "init", "install-units", "--prefix", str(units), "--sealfs", "/usr/local/bin/sealfs",
    )  # fmt: skip
    (units / "sealfs-vm-test.service").write_text(TEST_SERVICE)
    drop_in = units / "sealfs-vm-test.service.d"
    drop_in.mkdir()
    (drop_in / "kms.conf").write_text(
        f"[Service]\nEnvironment=KMS_URL=http://10.0.2.2:{kms.port} "
        f"KMS_KEY={kms.public_key.hex()} APP_ID={APP_ID.hex()}\n"
    )
    for target, unit in (("multi-user", "sealfs.target"), ("multi-user", "sealfs-vm-test.service")):
        wants = units / f"{target}.target.wants"
        wants.mkdir(exist_ok=True)
        (wants / unit).symlink_to(f"../{unit}")
    (etc / "sealfs").mkdir()
    (etc / "sealfs" / "volumes.toml").write_text(_config(kms))
    for mountpoint in ("mnt/data", "mnt/db"):
        (root / mountpoint).mkdir(parents=True)


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("vmboot")
    state = make_state(base / "kms")
    state.put(sim_policy(APP_ID, DEV_COMPOSE_HASH))
    kms = start_kms(state, "--allow-simulated")
    try:
        work = base / "work"
        work.mkdir()
        _overlay(work / "overlay", kms)
        (work / "guest.sh").write_text(GUEST)
        token = secrets.token_hex(16)
        (work / "token").write_text(token + "\n")
        disks = [_disk(base / "vda.img", 128, ext4=True), _disk(base / "vdb.img", 64, ext4=False)]
        proc = subprocess.run(
            ["bash", str(REPO / "tools" / "vm" / "boot.sh"), "--timeout", str(BOOT_TIMEOUT),
             *[arg for d in disks for arg in ("--disk", str(d))],
             "--mount", "/dev/vda:/var/lib/sealfs", str(work)],
            capture_output=True, text=True, check=False, timeout=BOOT_TIMEOUT + 300,
        )  # fmt: skip
        yield Boot(proc.returncode, proc.stdout + proc.stderr, work, token)
    finally:
        kms.stop()


@pytest.mark.timeout(BOOT_TIMEOUT + 400)
def test_systemd_boots_as_pid1_and_runs_sealfs_init(boot: Boot) -> None:
    for name in ("boot1", "boot2"):
        report = boot.phase(name)
        assert report["pid1"] == "systemd"
        assert report.get("done") == "yes", report
    assert boot.returncode == 0, boot.tail()


@pytest.mark.timeout(BOOT_TIMEOUT + 400)
def test_sealfs_init_brings_both_volumes_up(boot: Boot) -> None:
    for name in ("boot1", "boot2"):
        report = boot.phase(name)
        assert report["init_result"] == "success", report
        assert report["target"] == "active", report
        assert report["data_unit"] == "active" and report["db_mounted"] == "yes", report


@pytest.mark.timeout(BOOT_TIMEOUT + 400)
def test_data_survives_the_reboot(boot: Boot) -> None:
    first, second = boot.phase("boot1"), boot.phase("boot2")
    assert first.get("data_write") == "ok", first
    assert second["data_read"] == boot.token
    assert first.get("db_write") == "ok", first
    assert second["db_read"] == boot.token


@pytest.mark.timeout(BOOT_TIMEOUT + 400)
def test_systemd_restarts_a_killed_daemon_with_data_intact(boot: Boot) -> None:
    report = boot.phase("boot2")
    assert report["daemon_after"] not in ("0", report["daemon_before"]), report
    # One restart: the dead mount is detached before it (a second would mean it was not).
    assert report["restarts"] == "1", report
    assert report["data_after_restart"] == boot.token, report
