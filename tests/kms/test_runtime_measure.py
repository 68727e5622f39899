"""Measuring runtime events: the log line and the RTMR3 extend stay in step, the log is
opened without following links, and the simulated TEE's RTMR3 outlives its process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sealfs.attest import eventlog as E
from sealfs.attest.rtmr import KernelRtmr3, measure
from sealfs.attest.simulated import PersistentSimulatedAttester, verify_quote
from sealfs.errors import AttestationError
from tests.kms.conftest import APP_A, COMPOSE_A


def tee(tmp_path: Path) -> PersistentSimulatedAttester:
    return PersistentSimulatedAttester(
        APP_A, COMPOSE_A, register=tmp_path / "run" / "rtmr3", event_log=tmp_path / "log" / "ev"
    )


def test_power_on_then_measure_keeps_log_and_register_in_step(tmp_path: Path) -> None:
    sim = tee(tmp_path)
    assert [e.name for e in sim.event_log()] == ["app-id", "compose-hash", "boot-mr-done"]
    assert sim.rtmr3 == E.replay(sim.event_log())
    measure(sim.event_log_path, sim, E.RuntimeEvent("sealfs-volume", b'{"v":1}'))
    # A second process sees the same CVM: no new power-on, the measurement is there.
    again = tee(tmp_path)
    assert [e.name for e in again.event_log()][-1] == "sealfs-volume"
    assert again.rtmr3 == E.replay(again.event_log()) != E.replay(again.event_log()[:-1])
    report = verify_quote(again.quote(bytes(64)), again.collateral(), time.time())
    assert report.rtmr3 == E.replay(again.event_log())
    assert os.stat(sim.event_log_path).st_mode & 0o777 == 0o600
    assert os.stat(sim.register).st_mode & 0o777 == 0o600
    line = sim.event_log_path.read_text().splitlines()[-1]
    assert line.endswith(',"version":1}')


def test_a_failed_extend_takes_the_log_line_back(tmp_path: Path) -> None:
    sim = tee(tmp_path)
    before = sim.event_log_path.read_bytes()

    class Broken:
        def extend(self, digest: bytes) -> None:
            raise AttestationError("extend failed")

    with pytest.raises(AttestationError, match="extend failed"):
        measure(sim.event_log_path, Broken(), E.RuntimeEvent("x", b"y"))
    assert sim.event_log_path.read_bytes() == before
    assert sim.rtmr3 == E.replay(sim.event_log())


def test_the_log_is_never_followed_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "log"
    link.symlink_to(target)
    with pytest.raises(AttestationError, match="symbolic link"):
        E.append_runtime_event(link, E.RuntimeEvent("x", b""))
    with pytest.raises(AttestationError, match="symbolic link"):
        E.load_runtime_log(link)
    assert target.read_text() == ""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(AttestationError, match="not a regular file"):
        E.append_runtime_event(fifo, E.RuntimeEvent("x", b""))


def test_an_oversized_log_is_refused_unread(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with open(log, "wb") as f:
        f.truncate(E.MAX_LOG_BYTES + 1)
    with pytest.raises(AttestationError, match="larger than"):
        E.load_runtime_log(log)


def test_the_kernel_interface_gets_the_digest(tmp_path: Path) -> None:
    """Writing the 48-byte digest is the whole protocol of the sysfs attribute (a regular
    file stands in for it here); a missing attribute is a one-line error."""
    attr = tmp_path / "rtmr3:sha384"
    attr.write_bytes(b"")
    event = E.RuntimeEvent("sealfs-volume", b"p")
    KernelRtmr3(attr).extend(event.digest())
    assert attr.read_bytes() == event.digest()
    missing = KernelRtmr3(tmp_path / "absent")
    assert not missing.available()
    with pytest.raises(AttestationError, match="Linux >= 6.16"):
        missing.extend(event.digest())
