"""``sealfs init serve NAME [CONFIG]``: the FUSE daemon of one sealfs volume of the volume list,
in the foreground, as the main process of ``sealfs@NAME.service``.

``sealfs init up`` hands each sealfs volume to systemd this way (:func:`start_unit`, when
:func:`under_systemd`), so that systemd restarts a daemon that dies. ``up`` first pins the
volume id it validated (``/run/sealfs/init/NAME.volume-id``): the daemon, and every restart of
it, refuses any other volume the host might swap in. The daemon tells systemd it is ready
(sd_notify READY=1) only once the volume is mounted, so ``systemctl start`` returns when the
mount can be used. ``--detach-stale`` is the unit's
ExecStartPre: a daemon killed with SIGKILL leaves a dead FUSE mount behind that nothing can
mount over; it is lazily detached (open files of the dead mount stay dead, new opens see the
new daemon).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import click

from sealfs.cli.logs import log_service
from sealfs.errors import SealfsError, UsageError
from sealfs.fuse.mount import is_mounted, serve
from sealfs.init.config import DEFAULT_CONFIG, InitConfig, VolumeConfig, load_config
from sealfs.init.reach import attester_for, reach_kms
from sealfs.volume.header import KmsCredential

log = logging.getLogger(__name__)
PIN_DIR = Path("/run/sealfs/init")
UNIT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def under_systemd() -> bool:
    """True when this process is a systemd service on a system booted with systemd (as
    ``sealfs init up`` in sealfs-init.service is): daemons then go to sealfs@NAME.service."""
    return "INVOCATION_ID" in os.environ and Path("/run/systemd/system").is_dir()


def start_unit(name: str, volume_id: bytes | None) -> tuple[int, str]:
    """Start sealfs@NAME.service, serving only ``volume_id`` (when given), and wait until it
    is mounted (or failed); return the daemon's pid and where its log is."""
    if not UNIT_NAME.fullmatch(name):
        raise UsageError(f"volume name {name!r} cannot name a systemd unit (letters, digits, _.-)")
    unit = f"sealfs@{name}.service"
    PIN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    pin = PIN_DIR / f"{name}.volume-id"
    if volume_id is None:
        pin.unlink(missing_ok=True)
    else:
        tmp = pin.with_name(f".{pin.name}.tmp")
        tmp.write_text(volume_id.hex() + "\n")
        tmp.replace(pin)
    done = subprocess.run(["systemctl", "start", unit], capture_output=True, text=True)
    if done.returncode != 0:
        # Restart=on-failure would try again by itself and could mount the volume after `up`
        # reported the failure and undid its mounts: cancel that.
        subprocess.run(["systemctl", "stop", unit], capture_output=True)
        raise SealfsError(f"{unit} did not start (see journalctl -u {unit})")
    shown = subprocess.run(
        ["systemctl", "show", "--property=MainPID", "--value", unit],
        capture_output=True, text=True,
    )  # fmt: skip
    return int(shown.stdout.strip() or 0), f"journalctl -u {unit}"


def _pinned_volume(name: str) -> bytes | None:
    """The volume id ``up`` pinned for NAME, if any (not followed if it is a link)."""
    try:
        fd = os.open(PIN_DIR / f"{name}.volume-id", os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SealfsError(f"cannot read the pinned volume id of {name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        text = f.read(128).decode(errors="replace").strip()
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise SealfsError(f"the pinned volume id of {name} is not hex: {text!r}") from None


def detach_dead_mount(mountpoint: Path) -> bool:
    """Lazily detach a FUSE mount whose daemon is gone; True if there was one. A live mount
    is left alone: the new daemon then refuses to start, busy. statfs, not stat, tells them
    apart: the kernel answers stat of the root from its attribute cache for a while after the
    daemon died, statfs always asks the daemon (a dead one: ENOTCONN)."""
    if not is_mounted(mountpoint):
        return False
    try:
        os.statvfs(mountpoint)
        return False
    except OSError:
        pass
    for command in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        try:
            done = subprocess.run([*command, str(mountpoint)], capture_output=True, check=False)
        except FileNotFoundError:
            continue
        if done.returncode == 0:
            log.warning("detached the dead mount on %s", mountpoint)
            return True
    raise SealfsError(f"cannot detach the dead mount on {mountpoint}")


def notify_ready() -> None:
    """sd_notify(READY=1) when systemd asked for it (Type=notify); a no-op otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(f"READY=1\nMAINPID={os.getpid()}".encode(), address)


@click.command("serve")
@click.argument("name")
@click.argument("config", type=click.Path(dir_okay=False), default=DEFAULT_CONFIG)
@click.option(
    "--detach-stale",
    is_flag=True,
    help="Only lazily detach a dead mount on the volume's mountpoint, then exit.",
)
def serve_volume(name: str, config: str, detach_stale: bool) -> None:
    """Serve sealfs volume NAME of CONFIG in the foreground (the main process of
    sealfs@NAME.service), logging to standard error.

    Unlocks the volume through the KMS of CONFIG's [kms] table, mounts its backing directory
    on its mountpoint and reports readiness to systemd (sd_notify) once mounted. It refuses
    any volume but the one `sealfs init up` validated and pinned
    (/run/sealfs/init/NAME.volume-id), if it pinned one. SIGTERM commits everything and
    unmounts. Creating, validating and measuring the volume is
    `sealfs init up`'s work: this command only serves a volume that exists.
    """
    cfg = load_config(Path(config))
    vol = _volume(cfg, name)
    log_service(sys.stderr, logging.INFO)
    if detach_stale:
        detach_dead_mount(vol.mountpoint)
        return
    attester, _ = attester_for(cfg)
    client = reach_kms(cfg.kms, attester)
    pinned = _pinned_volume(name) or vol.volume_id
    serve(
        vol.source,
        vol.mountpoint,
        KmsCredential(client, pinned),
        allow_other=True,
        ready=notify_ready,
    )


def _volume(cfg: InitConfig, name: str) -> VolumeConfig:
    """The sealfs volume NAME of the volume list."""
    for vol in cfg.volumes:
        if vol.name == name:
            if vol.kind != "sealfs":
                raise UsageError(f"{cfg.path}: volume {name!r} is not of kind 'sealfs'")
            return vol
    raise UsageError(f"{cfg.path}: no volume named {name!r}")
