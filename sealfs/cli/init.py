"""``sealfs init``: the CVM's volumes at boot (up, down, status); see docs/init.md."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from sealfs.init.config import DEFAULT_CONFIG, InitConfig, VolumeConfig, load_config
from sealfs.volume.header import KmsCredential

from .init_serve import serve_volume, start_unit, under_systemd
from .init_units import install_units
from .output import emit, json_option

if TYPE_CHECKING:
    from sealfs.init.sealfs_volume import Starter

config_argument = click.argument(
    "config", default=DEFAULT_CONFIG, required=False, type=click.Path(dir_okay=False)
)


@click.group("init")
def init() -> None:
    """Bring a confidential VM's volumes up at boot: unlocked through attestation, created on
    their first boot only, validated, mounted and measured into RTMR3.

    CONFIG (default /etc/sealfs/volumes.toml) lists the KMS and the volumes; its schema, the
    boot sequence, what is measured and the failure rules are in docs/init.md. A configuration
    mistake exits 2 naming file:line and the field.
    """


def _progress(line: str) -> None:
    click.echo(line, err=True)


def _starter(cfg: InitConfig) -> Starter:
    """Start a volume's mount daemon: under systemd as sealfs@NAME.service (restarted if it
    dies, serving only the volume id validated here), else as `sealfs mount` does, logging to
    <runtime_dir>/<name>.log (integrity failures are logged there with their path)."""
    from sealfs.cli.mount import start_daemon

    if under_systemd():
        return lambda vol, cred: start_unit(vol.name, cred.expected_volume)

    def start(vol: VolumeConfig, cred: KmsCredential) -> tuple[int, str]:
        log = str(cfg.runtime_dir / f"{vol.name}.log")
        return start_daemon(
            str(vol.source), str(vol.mountpoint), cred, log, os.geteuid() == 0, 5.0, []
        )

    return start


@init.command("up")
@config_argument
@click.option(
    "--continue-on-error",
    is_flag=True,
    help="Bring up the other volumes when one fails (a degraded start) instead of undoing "
    "this run's mounts; the exit status still reports the first failure.",
)
@json_option
def up_cmd(config: str, continue_on_error: bool, as_json: bool) -> None:
    """Bring every volume in CONFIG up, in order.

    For each volume: reach the KMS (the URLs in order, retrying with backoff until the
    deadline), create it if this is its genuine first boot and `create = "first-boot"`,
    validate it (header, key, KMS anchor; LUKS: strict header validation), mount it (sealfs:
    a mount daemon; LUKS: open, fsck, mount), set owner and mode of its root, then measure it:
    one `sealfs-volume` line in the runtime event log and RTMR3 extended with its digest.

    Volumes already up are left alone. On a failure every volume this run mounted is
    unmounted again and the command exits non-zero with one line naming the volume and the
    cause. Safe to run again after any crash: an interrupted first boot resumes, an existing
    volume is never re-created. Progress goes to standard error; the state (for `status` and
    `down`) to <runtime_dir>/state.json, each daemon's log to <runtime_dir>/<name>.log.

    Exit codes: 0 every volume up; 2 a configuration mistake (file:line and field); 3 a key
    that does not open; 4 no volume and create = "never"; 5 integrity, rollback or a volume
    that must not be re-created; 6 busy; 8 KMS unreachable at the deadline or refusing;
    9 attestation; 10 LUKS (header refused, no device-mapper).
    """
    from sealfs.init.run import up

    cfg = load_config(config)
    state = up(cfg, _starter(cfg), _progress, continue_on_error)
    emit(
        {"ok": True, "volumes": state},
        as_json,
        f"{len(cfg.volumes)} volume(s) up, measured into RTMR3 (log {cfg.kms.event_log})",
    )


@init.command("down")
@config_argument
@json_option
def down_cmd(config: str, as_json: bool) -> None:
    """Unmount every volume in CONFIG, in reverse order.

    A sealfs daemon writes back, commits and advances its KMS anchor before it exits; a LUKS
    volume is unmounted (the kernel flushes) and its mapping closed. Volumes that are not
    mounted are skipped. A volume still in use fails with exit code 6 (see fuser -m); the
    others are still taken down.
    """
    from sealfs.init.run import down

    cfg = load_config(config)
    state = down(cfg, _progress)
    emit({"ok": True, "volumes": state}, as_json, f"{len(cfg.volumes)} volume(s) down")


@init.command("status")
@config_argument
@json_option
def status_cmd(config: str, as_json: bool) -> None:
    """Show each volume of CONFIG: mounted?, kind, volume id, anchored epoch at mount, daemon
    pid, and the last error `up` recorded (from the state file in the runtime directory,
    checked against the live mount table)."""
    from sealfs.init.run import status

    cfg = load_config(config)
    rows = status(cfg)
    lines = [
        f"{r['name']:<16} {r['kind']:<6} {'mounted' if r['mounted'] else 'down':<8} "
        f"{r['mountpoint']}  epoch={r['epoch'] if r['epoch'] is not None else '-'} "
        f"pid={r['pid'] or '-'} id={r['volume_id'] or '-'}"
        + (f"  last error: {r['error']}" if r["error"] else "")
        for r in rows
    ]
    emit({"ok": True, "volumes": rows}, as_json, "\n".join(lines))


init.add_command(install_units)
init.add_command(serve_volume)
