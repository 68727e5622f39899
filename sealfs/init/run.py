"""``up``, ``down`` and ``status`` over the whole volume list (docs/init.md).

``up`` brings the volumes up in file order and, on the first failure (unless told to continue),
takes down again every volume *this run* mounted, in reverse order, before it reports: a boot
either has all its volumes, measured, or none that it mounted. Errors keep their kind (and so
their exit code) and gain the volume's name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sealfs.attest.rtmr import Rtmr3, measure
from sealfs.errors import BusyError, SealfsError, UsageError
from sealfs.fuse.mount import is_mounted, runtime_file, served_backing
from sealfs.kms.client import Attester

from . import luks_volume, sealfs_volume
from .config import InitConfig, VolumeConfig
from .measure import volume_event
from .mounted import Mounted, crash_point
from .reach import attester_for, reach_kms
from .state import load_state, save_state

log = logging.getLogger("sealfs.init")

#: Progress lines for the operator (the CLI prints them to standard error).
Report = Callable[[str], None]


def _named(vol: VolumeConfig, e: SealfsError) -> SealfsError:
    """The same error (kind, exit code), its message naming the volume."""
    if not e.message.startswith(f"{vol.label}: "):
        e.message = f"{vol.label}: {e.message}"
        e.args = (e.message,)
    return e


def _is_up(vol: VolumeConfig) -> bool:
    """Already up from an earlier run: ``up`` leaves it alone (and measures nothing new)."""
    if vol.kind == "luks":
        return luks_volume.is_up_luks(vol)
    if not is_mounted(vol.mountpoint):
        return False
    if served_backing(vol.mountpoint) != vol.source.absolute():
        raise BusyError(f"{vol.mountpoint} is already mounted, but not from {vol.source}")
    return True


def _take_down(vol: VolumeConfig) -> None:
    if vol.kind == "luks":
        luks_volume.down_luks(vol)
    else:
        sealfs_volume.down_sealfs(vol)


def _set_root(vol: VolumeConfig) -> None:
    """Owner and mode of the mounted root, on every boot (idempotent)."""
    try:
        if vol.owner is not None:
            os.chown(vol.mountpoint, *vol.owner)
        if vol.mode is not None:
            os.chmod(vol.mountpoint, vol.mode)
    except OSError as e:
        raise UsageError(f"cannot set owner/mode of {vol.mountpoint}: {e.strerror}") from None


def _has_root(vol: VolumeConfig) -> bool:
    """Whether the volume is mounted at all (a LUKS volume without file system is not)."""
    return vol.kind == "sealfs" or vol.filesystem != "none"


def _mountpoint(vol: VolumeConfig) -> None:
    if _has_root(vol) and not is_mounted(vol.mountpoint):
        try:
            vol.mountpoint.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create mountpoint {vol.mountpoint}: {e.strerror}") from None


def _bring_up(
    vol: VolumeConfig,
    attester: Attester,
    register: Rtmr3,
    cfg: InitConfig,
    start: sealfs_volume.Starter,
    report: Report,
) -> Mounted:
    _mountpoint(vol)
    report(f"{vol.label}: reaching the KMS")
    client = reach_kms(cfg.kms, attester)
    report(f"{vol.label}: KMS at {client.url}")
    if vol.kind == "luks":
        mounted = luks_volume.up_luks(vol, client)
    else:
        mounted = sealfs_volume.up_sealfs(vol, client, start)
    try:
        if _has_root(vol):
            _set_root(vol)
        measure(cfg.kms.event_log, register, volume_event(mounted))
        mounted.steps.append("measured")
        crash_point("measured")
    except BaseException:
        with contextlib.suppress(SealfsError):
            _take_down(vol)
        raise
    return mounted


def _entry(vol: VolumeConfig, **fields: Any) -> dict[str, Any]:
    return {
        "kind": vol.kind,
        "mountpoint": str(vol.mountpoint),
        "source": str(vol.source),
        "updated": int(time.time()),
        **fields,
    }


def _record(m: Mounted) -> dict[str, Any]:
    return _entry(
        m.vol,
        mounted=True,
        volume_id=m.volume_id,
        epoch=m.anchor[0],
        pid=m.pid,
        log=m.log,
        steps=m.steps,
        error=None,
    )


def up(
    cfg: InitConfig, start: sealfs_volume.Starter, report: Report, continue_on_error: bool = False
) -> dict[str, dict[str, Any]]:
    """Bring every volume up; raise the first failure after undoing this run's mounts (or,
    with ``continue_on_error``, after trying every volume). Returns the state per volume."""
    state = load_state(cfg.runtime_dir)
    attester, register = attester_for(cfg)
    mounted: list[Mounted] = []
    failures: list[SealfsError] = []
    for vol in cfg.volumes:
        try:
            if _is_up(vol):
                report(f"{vol.label}: already up on {vol.mountpoint}")
                state[vol.name] = {**state.get(vol.name, _entry(vol)), "mounted": True}
                continue
            m = _bring_up(vol, attester, register, cfg, start, report)
        except SealfsError as e:
            failures.append(_named(vol, e))
            state[vol.name] = _entry(vol, mounted=False, error=e.message)
            save_state(cfg.runtime_dir, state)
            if continue_on_error:
                report(f"sealfs: error: {e.message} (continuing)")
                continue
            _undo(mounted, state, report)
            save_state(cfg.runtime_dir, state)
            raise
        mounted.append(m)
        state[vol.name] = _record(m)
        save_state(cfg.runtime_dir, state)
        report(f"{vol.label}: up on {vol.mountpoint} ({', '.join(m.steps)})")
    if failures:
        raise failures[0]
    return state


def _undo(mounted: list[Mounted], state: dict[str, dict[str, Any]], report: Report) -> None:
    for m in reversed(mounted):
        try:
            _take_down(m.vol)
            state[m.vol.name].update(mounted=False, pid=None)
            report(f"{m.vol.label}: unmounted again")
        except SealfsError as e:
            log.error("%s: could not be unmounted again: %s", m.vol.label, e.message)
            report(f"{m.vol.label}: could NOT be unmounted again: {e.message}")


def down(cfg: InitConfig, report: Report) -> dict[str, dict[str, Any]]:
    """Take every volume down in reverse order; raise the first failure after trying all."""
    state = load_state(cfg.runtime_dir)
    failures: list[SealfsError] = []
    for vol in reversed(cfg.volumes):
        try:
            if not _is_up(vol):
                report(f"{vol.label}: not mounted")
                continue
            _take_down(vol)
        except SealfsError as e:
            failures.append(_named(vol, e))
            state.setdefault(vol.name, _entry(vol))["error"] = e.message
            continue
        state[vol.name] = {**state.get(vol.name, _entry(vol)), "mounted": False, "pid": None}
        report(f"{vol.label}: unmounted {vol.mountpoint}")
    save_state(cfg.runtime_dir, state)
    if failures:
        raise failures[0]
    return state


def _daemon_pid(mountpoint: Path) -> int | None:
    """The pid the mount daemon recorded, if that process is alive."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        pid = int(json.loads(runtime_file(mountpoint.absolute()).read_text())["pid"])
        os.kill(pid, 0)
        return pid
    return None


def status(cfg: InitConfig) -> list[dict[str, Any]]:
    """Per volume, in configuration order: the recorded state checked against the live one."""
    state = load_state(cfg.runtime_dir)
    out = []
    for vol in cfg.volumes:
        recorded = state.get(vol.name, {})
        try:
            live = (
                luks_volume.is_up_luks(vol)
                if vol.kind == "luks"
                else is_mounted(vol.mountpoint)
                and served_backing(vol.mountpoint) == vol.source.absolute()
            )
        except SealfsError as e:
            live, recorded = False, {**recorded, "error": e.message}
        out.append(
            {
                "name": vol.name,
                "kind": vol.kind,
                "source": str(vol.source),
                "mountpoint": str(vol.mountpoint),
                "mounted": live,
                "volume_id": recorded.get("volume_id"),
                "epoch": recorded.get("epoch"),
                "pid": _daemon_pid(vol.mountpoint) if vol.kind == "sealfs" and live else None,
                "log": recorded.get("log"),
                "error": recorded.get("error"),
            }
        )
    return out
