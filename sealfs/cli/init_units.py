"""``sealfs init install-units``: the systemd units that bring a CVM's volumes up at boot.

Three units and two drop-ins, generated here so that they name the very ``sealfs`` and the
config this machine uses:

- ``sealfs-init.service`` runs ``sealfs init up`` once per boot (``init down`` at shutdown),
  after the network is up and before the container runtime;
- ``sealfs@NAME.service`` runs the FUSE daemon of sealfs volume NAME in the foreground as its
  main process (``sealfs init serve NAME``), restarted by systemd if it dies; a dead daemon's
  mount is lazily detached before the restart, so the new daemon can mount again;
- ``sealfs.target`` is reached only when ``sealfs-init.service`` succeeded: what an app (and
  the drop-ins for docker.service and containerd.service) require, so that no container starts
  on top of a missing or half-mounted volume.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from sealfs.errors import UsageError
from sealfs.init.config import DEFAULT_CONFIG

DEFAULT_PREFIX = "/etc/systemd/system"
CONTAINER_RUNTIMES = ("docker.service", "containerd.service")

INIT_SERVICE = """\
[Unit]
Description=sealfs: unlock, validate, mount and measure the volumes of {config}
Wants=network-online.target
After=network-online.target local-fs.target
Before=sealfs.target {runtimes}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={sealfs} init up {config}
ExecStop={sealfs} init down {config}
# The KMS retry deadline and the checks in the config bound the start; a first-boot LUKS
# format with integrity wipes the whole device, which no fixed timeout fits.
TimeoutStartSec=infinity
TimeoutStopSec=300
StandardOutput=journal+console
StandardError=journal+console
LimitCORE=0

[Install]
WantedBy=sealfs.target
"""

DAEMON_SERVICE = """\
[Unit]
Description=sealfs FUSE daemon of volume %i ({config})
Wants=network-online.target
After=network-online.target local-fs.target
# Started by `sealfs init up` (in sealfs-init.service), which waits for it: an After= on
# sealfs-init would deadlock. Before= orders the shutdown: the app's units (After=sealfs.target)
# stop first, then `sealfs init down` unmounts, and only then is a daemon left here stopped.
Before=sealfs-init.service sealfs.target

[Service]
Type=notify
NotifyAccess=main
# A daemon that died (SIGKILL, OOM) leaves a dead FUSE mount: detach it lazily first.
ExecStartPre={sealfs} init serve --detach-stale %i {config}
ExecStart={sealfs} init serve %i {config}
Restart=on-failure
RestartSec=2
# SIGTERM makes the daemon commit everything and unmount; give it the time to.
KillMode=mixed
TimeoutStartSec=infinity
TimeoutStopSec=300
LimitCORE=0
"""

TARGET = """\
[Unit]
Description=sealfs volumes are up: unlocked, validated, mounted and measured
Requires=sealfs-init.service
After=sealfs-init.service

[Install]
WantedBy=multi-user.target
"""

RUNTIME_DROP_IN = """\
# Installed by `sealfs init install-units`: no container starts without its volumes.
[Unit]
Requires=sealfs.target
After=sealfs.target
"""


def render_units(sealfs: str, config: str) -> dict[str, str]:
    """Unit file name (relative to the unit directory) -> text."""
    for what, value in (("sealfs command", sealfs), ("config", config)):
        if not value.startswith("/") or any(c.isspace() or c in "%$\\\"'" for c in value):
            raise UsageError(f"{what} {value!r} must be an absolute path without spaces, %, $")
    fields = {"sealfs": sealfs, "config": config, "runtimes": " ".join(CONTAINER_RUNTIMES)}
    units = {
        "sealfs-init.service": INIT_SERVICE.format(**fields),
        "sealfs@.service": DAEMON_SERVICE.format(**fields),
        "sealfs.target": TARGET,
    }
    for runtime in CONTAINER_RUNTIMES:
        units[f"{runtime}.d/sealfs.conf"] = RUNTIME_DROP_IN
    return units


def default_sealfs_command() -> str:
    """The ``sealfs`` this process runs as, so the units use the same installation."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "sealfs" and argv0.is_absolute():
        return str(argv0)
    found = shutil.which("sealfs")
    if found is None:
        raise UsageError("cannot find the sealfs command on PATH: give --sealfs PATH")
    return os.path.abspath(found)


def install(prefix: Path, units: dict[str, str]) -> list[Path]:
    """Write every unit (replacing an older one) and return the paths written."""
    written = []
    for name, text in units.items():
        path = prefix / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.chmod(0o644)
            tmp.replace(path)
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror}") from None
        written.append(path)
    return written


@click.command("install-units")
@click.option(
    "--prefix",
    type=click.Path(file_okay=False),
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Directory to write the units into (an image build can give its root's).",
)
@click.option(
    "--config",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The volume list the units pass to `sealfs init`.",
)
@click.option(
    "--sealfs",
    "sealfs_command",
    metavar="PATH",
    help="The sealfs command the units run (default: this one).",
)
def install_units(prefix: str, config: str, sealfs_command: str | None) -> None:
    """Write the systemd units that bring the volumes up at boot, and say what to enable.

    Writes sealfs-init.service (oneshot: `sealfs init up` after network-online.target and
    before the container runtime; `sealfs init down` at shutdown), the sealfs@.service
    template (one FUSE daemon per sealfs volume, restarted if it dies, a dead mount detached
    first), sealfs.target (reached only when every volume is up), and drop-ins that make
    docker.service and containerd.service require sealfs.target. Existing files of the same
    names are replaced; nothing is enabled or started.
    """
    units = render_units(sealfs_command or default_sealfs_command(), config)
    for path in install(Path(prefix), units):
        click.echo(f"wrote {path}")
    click.echo("enable with: systemctl daemon-reload && systemctl enable sealfs.target")
