"""``sealfs attest verify`` run as the real console script, on real TDX quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tdx_vectors import TDX_VECTORS

TESTDATA = TDX_VECTORS

QUOTE = TESTDATA / "tdx_quote"
COLLATERAL = TESTDATA / "tdx_quote_collateral.json"
OUTDATED = TESTDATA / "tdx_quote_outdated"
OUTDATED_COLLATERAL = TESTDATA / "tdx_quote_outdated_collateral.json"
TAPPD_HEX = TESTDATA / "quote-from-tappd.hex"
NOW = "2025-07-01T00:00:00Z"
NOW_OUTDATED = "2026-03-01T00:00:00Z"


def sealfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed ``sealfs`` script next to this interpreter, else ``python -m sealfs``."""
    script = Path(sys.executable).with_name("sealfs")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sealfs"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=60)


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("sealfs: error: ")
    assert result.stderr.count("\n") == 1


def test_up_to_date_quote_verifies():
    result = sealfs("attest", "verify", QUOTE, "--collateral", COLLATERAL, "--now", NOW)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data"):
        assert f"\n  {name} " in out
    assert "TCB status: UpToDate" in out
    assert "Advisories: none" in out
    assert "Result: VERIFIED" in out
    assert "FAIL" not in out


def test_json_output_is_one_document():
    result = sealfs("attest", "verify", QUOTE, "--collateral", COLLATERAL, "--now", NOW, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert doc["tcb"]["status"] == "UpToDate"
    assert doc["tcb"]["tdx_module"] == "TDX_01"
    assert doc["tcb"]["advisory_ids"] == []
    assert doc["platform"]["fmspc"] == "B0C06F000000"
    assert doc["valid_from"] == "2025-06-19T10:32:27Z"
    assert doc["valid_until"] == "2025-07-19T10:00:35Z"
    assert all(check["passed"] for check in doc["checks"])
    assert len(doc["measurements"]["mrtd"]) == 96


def test_no_matching_tcb_level_exits_9():
    result = sealfs(
        "attest", "verify", OUTDATED, "--collateral", OUTDATED_COLLATERAL, "--now", NOW_OUTDATED
    )
    assert_clean_failure(result, 9)
    assert "no matching TCB level" in result.stderr
    assert "FAIL  tcb_status" in result.stdout
    assert "Result: FAILED" in result.stdout


def test_failure_in_json_mode_is_one_document_with_the_report():
    result = sealfs(
        "attest",
        "verify",
        OUTDATED,
        "--collateral",
        OUTDATED_COLLATERAL,
        "--now",
        NOW_OUTDATED,
        "--json",
    )
    assert result.returncode == 9
    doc = json.loads(result.stdout)
    assert (doc["ok"], doc["error"]) == (False, "attestation")
    assert "no matching TCB level" in doc["message"]
    assert doc["tcb"] is None
    assert [c["name"] for c in doc["checks"] if not c["passed"]] == ["tcb_status"]


def test_expired_collateral_exits_9():
    result = sealfs(
        "attest", "verify", QUOTE, "--collateral", COLLATERAL, "--now", "2025-07-19T10:00:36Z"
    )
    assert_clean_failure(result, 9)
    assert "not valid at 2025-07-19T10:00:36Z" in result.stderr


def test_hex_quote_without_collateral_shows_measurements_and_fails():
    result = sealfs("attest", "verify", TAPPD_HEX, "--now", NOW)
    assert_clean_failure(result, 9)
    assert "ok    quote_signature" in result.stdout
    assert "ok    pck_chain" in result.stdout
    assert "FAIL  collateral" in result.stdout
    assert "\n  mrtd " in result.stdout


def test_tampered_quote_exits_9(tmp_path: Path):
    data = bytearray(QUOTE.read_bytes())
    data[48 + 136] ^= 0x01  # first byte of MRTD
    tampered = tmp_path / "tampered"
    tampered.write_bytes(bytes(data))
    result = sealfs("attest", "verify", tampered, "--collateral", COLLATERAL, "--now", NOW)
    assert_clean_failure(result, 9)
    assert "quote_signature" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("/nonexistent/quote", "--now", NOW), 2, "cannot read quote file"),
        ((TESTDATA, "--now", NOW), 2, "Is a directory"),
        ((QUOTE, "--collateral", "/nonexistent/c.json", "--now", NOW), 2, "cannot read collateral"),
        ((QUOTE, "--collateral", COLLATERAL, "--now", "yesterday"), 2, "--now"),
        ((QUOTE, "--collateral", COLLATERAL, "--now", "2025-07-01T00:00:00"), 2, "zone"),
        # Valid times whose UTC falls outside years 1..9999 (was OverflowError, exit 1).
        ((QUOTE, "--collateral", COLLATERAL, "--now", "9999-12-31T23:59:59-23:59"), 2, "--now"),
        ((QUOTE, "--collateral", COLLATERAL, "--now", "0001-01-01T00:00:00+01:00"), 2, "--now"),
        ((QUOTE, "--collateral", COLLATERAL, "--now", "2025-02-30T00:00:00Z"), 2, "--now"),
        ((COLLATERAL, "--now", NOW), 9, "not hex"),
        ((QUOTE, "--collateral", QUOTE, "--now", NOW), 9, "collateral is not valid JSON"),
        ((QUOTE, "--collateral", TAPPD_HEX, "--now", NOW), 9, "collateral is not valid JSON"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(args: tuple, code: int, message: str):
    result = sealfs("attest", "verify", *args)
    assert_clean_failure(result, code)
    assert message in result.stderr


def test_bad_input_in_json_mode_is_a_json_error():
    result = sealfs("attest", "verify", "/nonexistent/quote", "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout) == {
        "ok": False,
        "error": "usage",
        "message": "cannot read quote file /nonexistent/quote: No such file or directory",
    }


def test_help_documents_checks_and_exit_codes():
    result = sealfs("attest", "verify", "--help")
    assert result.returncode == 0
    for text in ("--collateral", "--now", "--json", "tcb_status", "Exit status", "Examples"):
        assert text in result.stdout
    assert "verify" in sealfs("attest", "--help").stdout
