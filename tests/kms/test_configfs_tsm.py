"""The configfs-tsm quote source, against a directory tree that imitates configfs-tsm.

A background thread plays the kernel: for every report directory the attester creates it
publishes ``provider`` and ``generation`` and makes ``outblob`` a FIFO; when the attester reads
``outblob`` it takes ``inblob`` and answers with a TDX quote carrying that report_data (a real
quote from the test vectors with its report_data replaced, so it parses like the real thing
but its signature no longer verifies - as no quote made off TDX hardware can).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealfs.attest.configfs_tsm import ConfigfsTsmAttester
from sealfs.attest.eventlog import RuntimeEvent
from sealfs.attest.quote import parse_quote
from sealfs.errors import AttestationError
from sealfs.kms.client import KmsClient
from tests.tdx_vectors import TDX_VECTORS

from .conftest import APP_A, COMPOSE_A, KmsProcess

QUOTE = TDX_VECTORS / "tdx_quote"
REPORT_DATA_OFFSET = 48 + 520


class FakeTsm:
    def __init__(self, root: Path, provider: str = "tdx_guest", extra_writes: int = 0) -> None:
        self.root = root
        self.provider = provider
        self.extra_writes = extra_writes
        self.template = QUOTE.read_bytes()
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> FakeTsm:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for entry in self.root.iterdir():  # unblock writers whose reader never came
            fifo = entry / "outblob"
            if fifo.exists():
                try:
                    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
                    time.sleep(0.05)
                    os.close(fd)
                except OSError:
                    pass

    def _watch(self) -> None:
        while not self._stop.is_set():
            for entry in self.root.iterdir():
                if entry.name not in self._seen and entry.is_dir():
                    self._seen.add(entry.name)
                    self._setup(entry)
            time.sleep(0.002)

    def _setup(self, entry: Path) -> None:
        (entry / "generation").write_text("0\n")
        os.mkfifo(entry / "outblob")
        threading.Thread(target=self._answer, args=(entry,), daemon=True).start()
        tmp = entry / ".provider"
        tmp.write_text(self.provider + "\n")
        tmp.rename(entry / "provider")  # attributes appear atomically, provider last

    def _answer(self, entry: Path) -> None:
        try:
            with open(entry / "outblob", "wb") as out:  # blocks until the attester reads
                report_data = (entry / "inblob").read_bytes()
                (entry / "generation").write_text(f"{1 + self.extra_writes}\n")
                q = bytearray(self.template)
                q[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + 64] = report_data
                out.write(bytes(q))
        except OSError:
            pass


@pytest.fixture
def tsm_root(tmp_path: Path) -> Path:
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    return root


@pytest.fixture
def quiet_rmdir(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    # Real configfs removes a report directory with its attributes; a plain directory
    # cannot, so the attester logs a warning here. That is expected in this imitation.
    with caplog.at_level(logging.ERROR, "sealfs.attest"):
        yield


def test_quote_carries_report_data(tsm_root: Path, quiet_rmdir: None) -> None:
    rd = bytes(range(64))
    with FakeTsm(tsm_root):
        quote = ConfigfsTsmAttester(tsm_root).quote(rd)
    parsed = parse_quote(quote)
    assert parsed.report.report_data == rd
    assert parsed.report.mr_td == parse_quote(QUOTE.read_bytes()).report.mr_td


def test_each_quote_uses_its_own_report_directory(tsm_root: Path, quiet_rmdir: None) -> None:
    with FakeTsm(tsm_root):
        att = ConfigfsTsmAttester(tsm_root)
        a, b = att.quote(b"\x01" * 64), att.quote(b"\x02" * 64)
    assert parse_quote(a).report.report_data != parse_quote(b).report.report_data
    assert len(list(tsm_root.iterdir())) == 2


def test_measurements(tsm_root: Path, quiet_rmdir: None) -> None:
    with FakeTsm(tsm_root):
        m = ConfigfsTsmAttester(tsm_root).measurements()
    assert set(m) == {"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"}
    assert m["mrtd"] == parse_quote(QUOTE.read_bytes()).report.mr_td.hex()


def test_concurrent_inblob_write_is_detected(tsm_root: Path, quiet_rmdir: None) -> None:
    with (
        FakeTsm(tsm_root, extra_writes=1),
        pytest.raises(AttestationError, match="modified concurrently"),
    ):
        ConfigfsTsmAttester(tsm_root).quote(bytes(64))


def test_wrong_provider(tsm_root: Path, quiet_rmdir: None) -> None:
    with (
        FakeTsm(tsm_root, provider="sev_guest"),
        pytest.raises(AttestationError, match="not tdx_guest"),
    ):
        ConfigfsTsmAttester(tsm_root).quote(bytes(64))


def test_no_configfs(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="configfs-tsm not available"):
        ConfigfsTsmAttester(tmp_path / "absent").quote(bytes(64))
    with pytest.raises(ValueError):
        ConfigfsTsmAttester(tmp_path).quote(b"short")


def test_nothing_answers(tsm_root: Path) -> None:
    att = ConfigfsTsmAttester(tsm_root, attribute_wait_s=0.2)
    with pytest.raises(AttestationError, match="provider missing"):
        att.quote(bytes(64))


def test_event_log_and_collateral_files(tmp_path: Path) -> None:
    log = tmp_path / "runtime_events.log"
    events = [RuntimeEvent("app-id", APP_A), RuntimeEvent("compose-hash", COMPOSE_A)]
    att = ConfigfsTsmAttester(tmp_path, event_log_path=log, collateral_path=tmp_path / "coll.json")
    assert att.event_log() == []
    log.write_text("".join(e.to_json_line() + "\n" for e in events))
    assert att.event_log() == events
    (tmp_path / "coll.json").write_text(json.dumps({"tcb_info": "x"}))
    assert att.collateral() == {"tcb_info": "x"}
    (tmp_path / "coll.json").write_text("[1]")
    with pytest.raises(AttestationError):
        att.collateral()
    assert ConfigfsTsmAttester(tmp_path).collateral() is None


def test_kms_verifies_configfs_quotes_with_dcap(
    kms: KmsProcess, tsm_root: Path, tmp_path: Path, quiet_rmdir: None
) -> None:
    """The tdx path end to end: the KMS runs DCAP on the quote and refuses this one (its
    signature no longer covers the replaced report_data, and its collateral has expired)."""
    log = tmp_path / "runtime_events.log"
    log.write_text(
        RuntimeEvent("app-id", APP_A).to_json_line()
        + "\n"
        + RuntimeEvent("compose-hash", COMPOSE_A).to_json_line()
        + "\n"
    )
    coll = TDX_VECTORS / "tdx_quote_collateral.json"
    att = ConfigfsTsmAttester(tsm_root, event_log_path=log, collateral_path=coll)
    with FakeTsm(tsm_root):
        c = KmsClient(kms.url, APP_A, att, trusted_keys=[kms.public_key], deadline_s=5)
        with pytest.raises(AttestationError, match="attestation_failed"):
            c.get_key("volume-wrap", b"vol")
