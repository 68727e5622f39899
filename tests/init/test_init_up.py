"""`sealfs init up/down/status` on real FUSE mounts with a real KMS and the simulated TEE."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sealfs import failpoints
from sealfs.attest.eventlog import load_runtime_log, replay
from sealfs.attest.simulated import PersistentSimulatedAttester
from sealfs.errors import AttestationError
from sealfs.init.mounted import CRASH_POINTS
from sealfs.kms.client import KmsClient
from sealfs.volume.header import load_header
from tests.init.conftest import REPO, Cvm, dead_url
from tests.kms.conftest import APP_A, COMPOSE_A


def write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def volume_events(cvm: Cvm) -> list[dict[str, object]]:
    return [
        json.loads(e.payload) for e in load_runtime_log(cvm.event_log) if e.name == "sealfs-volume"
    ]


def test_first_boot_creates_second_boot_reuses(cvm: Cvm) -> None:
    data, logs = cvm.add("data"), cvm.add("logs")
    config = cvm.config([dead_url(), cvm.kms.url])  # the first replica is down: failover
    res = cvm.up(config)
    assert "volume data: up" in res.stderr and "created" in res.stderr
    assert cvm.mounted() == ["data", "logs"]
    st = os.stat(data.mnt)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o750)
    write(data.mnt / "f", "first boot")
    write(logs.mnt / "g", "also")
    status = cvm.status()
    ids = {name: status[name]["volume_id"] for name in ("data", "logs")}
    for name in ("data", "logs"):
        assert status[name]["mounted"] and status[name]["kind"] == "sealfs"
        os.kill(status[name]["pid"], 0)  # the daemon is alive
        assert status[name]["error"] is None
    assert ids["data"] == str(uuid.UUID(bytes=load_header(data.backing).volume_id))

    cvm.shutdown()
    assert cvm.mounted() == [] and not cvm.status()["data"]["mounted"]

    res = cvm.up(config)
    assert "created" not in res.stderr
    assert (data.mnt / "f").read_text() == "first boot"
    assert (logs.mnt / "g").read_text() == "also"
    assert {n: cvm.status()[n]["volume_id"] for n in ids} == ids
    # Running up again on a booted CVM leaves the volumes alone and measures nothing new.
    before = len(load_runtime_log(cvm.event_log))
    assert "already up" in cvm.up(config).stderr
    assert len(load_runtime_log(cvm.event_log)) == before


def test_event_log_replays_to_the_tee_rtmr3_and_the_kms_accepts_it(cvm: Cvm) -> None:
    data, logs = cvm.add("data"), cvm.add("logs")
    cvm.up()
    events = load_runtime_log(cvm.event_log)
    assert [e.name for e in events] == [
        "app-id",
        "compose-hash",
        "boot-mr-done",
        "sealfs-volume",
        "sealfs-volume",
    ]
    tee = PersistentSimulatedAttester(
        APP_A,
        COMPOSE_A,
        register=cvm.runtime / "simulated-rtmr3",
        event_log=cvm.event_log,
    )
    assert replay(events) == tee.rtmr3
    # The payload binds the volume id, the header's hash and the anchored commit.
    status = cvm.status()
    for vol, payload in zip((data, logs), volume_events(cvm), strict=True):
        assert payload["name"] == vol.name and payload["kind"] == "sealfs"
        assert payload["volume_id"] == status[vol.name]["volume_id"]
        header = (vol.backing / "sealfs.header").read_bytes()
        assert payload["header_sha256"] == hashlib.sha256(header).hexdigest()
        assert payload["anchor_epoch"] == status[vol.name]["epoch"]
    # The operator's replay prints the same RTMR3.
    res = subprocess.run(
        [sys.executable, "-m", "sealfs", "attest", "replay-log", str(cvm.event_log), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    replayed = json.loads(res.stdout)
    assert replayed["rtmr3"] == tee.rtmr3.hex() and len(replayed["events"]) == 5
    assert json.loads(replayed["events"][3]["payload_text"])["name"] == "data"
    # A quote carrying this RTMR3, with this log, is accepted by the KMS...
    client = KmsClient(cvm.kms.url, APP_A, tee, trusted_keys=[cvm.kms.public_key], deadline_s=10)
    vid = uuid.UUID(status["data"]["volume_id"]).bytes
    assert client.get_epoch(vid)[0] >= 0
    # ...and a log that does not explain it is refused.
    with open(cvm.event_log, "a") as f:
        payload = base64.b64encode(b'{"forged":1}').decode()
        f.write(json.dumps({"event": "sealfs-volume", "payload": payload, "version": 1}) + "\n")
    with pytest.raises(AttestationError):
        client.get_epoch(vid)


def test_kms_unreachable_fails_at_the_deadline_and_mounts_nothing(cvm: Cvm) -> None:
    data = cvm.add("data")
    cvm.add("logs")
    cvm.up()
    write(data.mnt / "f", "before the outage")
    cvm.shutdown()
    deadline = 1.5
    config = cvm.config([dead_url(), dead_url()], deadline=deadline)
    started = time.monotonic()
    res = cvm.init("up", config)
    elapsed = time.monotonic() - started
    assert res.returncode == 8, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("sealfs: error:")]
    assert len(lines) == 1 and "volume data: KMS not reachable within 1.5 s" in lines[0]
    assert elapsed >= deadline  # retried until the deadline, not given up at once
    assert cvm.mounted() == []
    assert "not reachable" in cvm.status()["data"]["error"]
    # The KMS is back: the same volume, not a new one, with its data.
    vid = load_header(data.backing).volume_id
    cvm.up()
    assert load_header(data.backing).volume_id == vid
    assert (data.mnt / "f").read_text() == "before the outage"


def test_a_failing_volume_unmounts_what_this_run_mounted(cvm: Cvm) -> None:
    cvm.add("data")
    cvm.add("other", create="never")
    res = cvm.init("up")
    assert res.returncode == 4, res.stderr
    assert res.stderr.strip().endswith(
        f'volume other: {cvm.volumes[1].backing} holds no sealfs volume, and create = "never"'
    )
    assert "volume data: unmounted again" in res.stderr
    assert cvm.mounted() == []
    assert not (cvm.volumes[1].backing / "sealfs.header").exists()
    # --continue-on-error: the good volume stays up, the exit status still says no.
    res = cvm.init("up", None, "--continue-on-error")
    assert res.returncode == 4 and cvm.mounted() == ["data"]
    assert cvm.status()["other"]["error"].endswith('create = "never"')


def test_a_volume_whose_header_is_gone_is_never_created_again(cvm: Cvm) -> None:
    data = cvm.add("data")
    cvm.up()
    write(data.mnt / "f", "precious")
    cvm.shutdown()
    (data.backing / "sealfs.header").rename(cvm.root / "saved.header")
    res = cvm.init("up")
    assert res.returncode == 5 and "first boot completed" in res.stderr, res.stderr
    assert not (data.backing / "sealfs.header").exists() and cvm.mounted() == []
    (cvm.root / "saved.header").rename(data.backing / "sealfs.header")
    cvm.up()
    assert (data.mnt / "f").read_text() == "precious"


def test_a_rolled_back_volume_is_never_mounted(cvm: Cvm) -> None:
    """The host hands back an older copy of the whole backing directory: the KMS anchor
    catches it, and init mounts nothing (not even read-only)."""
    data = cvm.add("data")
    cvm.up()
    write(data.mnt / "f", "version 1")
    cvm.shutdown()
    old = cvm.root / "old-copy"
    shutil.copytree(data.backing, old, symlinks=True)
    cvm.up()
    write(data.mnt / "f", "version 2")
    cvm.shutdown()
    shutil.rmtree(data.backing)
    shutil.copytree(old, data.backing, symlinks=True)
    res = cvm.init("up")
    assert res.returncode == 5, res.stderr
    assert "sealfs: error: volume data: volume is stale" in res.stderr
    assert cvm.mounted() == [] and "rolled back" in cvm.status()["data"]["error"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_at_each_step_of_first_boot_resumes(cvm: Cvm, point: str) -> None:
    """Power is lost at ``point`` of the first boot of volume "new"; the next boot finishes
    it. The volume "old" (initialised earlier, with data) and, once its header exists, "new"
    itself are never created again: their data survives."""
    new, old = cvm.add("new"), cvm.add("old")
    cvm.volumes.remove(new)
    cvm.up()
    write(old.mnt / "f", "old data")
    cvm.shutdown()
    cvm.volumes.insert(0, new)

    res = cvm.init("up", None, env={failpoints.ENV: f"init:{point}"})
    assert res.returncode == -9, res.stderr  # SIGKILL at the crash point
    cvm.power_loss()
    header_written = (new.backing / "sealfs.header").exists()
    assert header_written == (CRASH_POINTS.index(point) >= CRASH_POINTS.index("created"))
    vid = load_header(new.backing).volume_id if header_written else None

    cvm.up()
    assert cvm.mounted() == ["new", "old"]
    assert (old.mnt / "f").read_text() == "old data"
    if vid is not None:
        assert load_header(new.backing).volume_id == vid  # finished, not re-created
    write(new.mnt / "g", "new data")
    cvm.power_loss()
    cvm.up()
    assert (new.mnt / "g").read_text() == "new data"
    assert (old.mnt / "f").read_text() == "old data"


def test_down_skips_a_busy_volume_and_takes_the_others_down(cvm: Cvm) -> None:
    data = cvm.add("data")
    cvm.add("logs")
    cvm.up()
    with open(data.mnt / "open-file", "w") as busy:
        busy.write("held open")
        res = cvm.init("down")
        assert res.returncode == 6, res.stderr
        assert "sealfs: error: volume data: cannot unmount" in res.stderr
        assert cvm.mounted() == ["data"] and "volume logs: unmounted" in res.stderr
    res = cvm.init("down", None, "--json")
    assert res.returncode == 0, res.stderr
    assert not any(v["mounted"] for v in json.loads(res.stdout)["volumes"].values())
    assert cvm.mounted() == []
