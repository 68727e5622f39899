"""`sealfs kms` command line: init, policy management, serve; errors map to exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sealfs.attest import simulated

from .conftest import REPO, SECRET

APP = "e5" * 20
COMPOSE = "7a" * 32


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sealfs", "kms", *args],
        cwd=REPO,
        input=(stdin or b"").decode(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    f = tmp_path / "secret"
    f.write_bytes(SECRET)
    f.chmod(0o600)
    return f


@pytest.fixture
def state(tmp_path: Path, secret_file: Path) -> Path:
    path = tmp_path / "kms.db"
    res = run(
        "init",
        "--state",
        str(path),
        "--secret-file",
        str(secret_file),
        "--kdf-memory-kib",
        "8192",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["ok"] and len(bytes.fromhex(out["kms_public_key"])) == 32
    return path


def assert_fails(res: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert res.returncode == code, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    assert text in res.stderr + res.stdout


def test_init_from_stdin_and_refuse_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    res = run("init", "--state", str(path), "--kdf-memory-kib", "8192", stdin=SECRET + b"\n")
    assert res.returncode == 0, res.stderr
    assert "KMS public key" in res.stdout
    assert path.stat().st_mode & 0o077 == 0
    assert_fails(
        run("init", "--state", str(path), "--kdf-memory-kib", "8192", stdin=SECRET),
        2,
        "already exists",
    )


def test_secret_rules(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.write_bytes(SECRET)
    loose.chmod(0o640)
    assert_fails(
        run("init", "--state", str(tmp_path / "a.db"), "--secret-file", str(loose)),
        2,
        "accessible by group or others",
    )
    assert_fails(
        run("init", "--state", str(tmp_path / "b.db"), stdin=b"short"), 2, "at least 16 bytes"
    )
    assert_fails(
        run("init", "--state", str(tmp_path / "c.db"), "--secret-file", str(tmp_path / "missing")),
        2,
        "secret file",
    )
    assert not (tmp_path / "a.db").exists() and not (tmp_path / "b.db").exists()


def test_wrong_secret_exits_with_unlock_code(state: Path) -> None:
    res = run("info", "--state", str(state), "--json", stdin=b"a different operator secret")
    assert_fails(res, 3, "wrong operator secret")
    assert json.loads(res.stdout)["error"] == "unlock"


def test_policy_lifecycle(state: Path, secret_file: Path, tmp_path: Path) -> None:
    common = ["--state", str(state), "--secret-file", str(secret_file), "--json"]
    res = run(
        "policy",
        "set",
        APP,
        *common,
        "--simulated",
        "--compose-hash",
        COMPOSE,
        "--tcb-status",
        "UpToDate",
        "--tcb-status",
        "SWHardeningNeeded",
    )
    assert res.returncode == 0, res.stderr
    pol = json.loads(res.stdout)["policy"]
    assert pol["measurements"][0]["mrtd"] == simulated.DEFAULT_MRTD.hex()
    assert pol["tcb_statuses"] == ["UpToDate", "SWHardeningNeeded"] and pol["key_version"] == 1
    assert pol["allow_simulated"] is True
    assert pol["require_sept_ve_disable"] is True and pol["allow_service_td"] is False
    res = run(
        "policy",
        "set",
        APP,
        *common,
        "--simulated",
        "--compose-hash",
        COMPOSE,
        "--allow-sept-ve",
        "--allow-reserved-td-attributes",
        "--allow-service-td",
    )
    relaxed = json.loads(res.stdout)["policy"]
    assert (
        relaxed["require_sept_ve_disable"],
        relaxed["allow_reserved_td_attributes"],
        relaxed["allow_service_td"],
    ) == (False, True, True)

    res = run("policy", "rotate", APP, *common)
    assert json.loads(res.stdout)["key_version"] == 2
    # Replacing the policy keeps the rotated key version.
    doc = tmp_path / "policy.json"
    doc.write_text(
        json.dumps({"measurements": pol["measurements"], "compose_hashes": [COMPOSE, "7b" * 32]})
    )
    res = run("policy", "set", APP, *common, "--file", str(doc))
    assert res.returncode == 0, res.stderr
    shown = json.loads(run("policy", "show", APP, *common).stdout)["policies"][0]
    assert shown["key_version"] == 2 and len(shown["compose_hashes"]) == 2
    assert shown["tcb_statuses"] == ["UpToDate"]
    info = json.loads(run("info", *common).stdout)
    assert info["apps"] == [APP]

    assert run("policy", "remove", APP, *common).returncode == 0
    assert_fails(run("policy", "show", APP, *common), 2, "no policy")
    assert_fails(run("policy", "rotate", APP, *common), 2, "no policy")


@pytest.mark.parametrize(
    "args, text",
    [
        (["zz"], "APP_ID must be a string of hex digit pairs"),
        ([APP], "at least one measurement"),
        ([APP, "--simulated"], "at least one measurement and one compose hash"),
        ([APP, "--simulated", "--compose-hash", "00"], "32 bytes"),
        ([APP, "--mrtd", "00" * 48], "go together"),
        (
            [APP, "--simulated", "--compose-hash", COMPOSE, "--tcb-status", "Revoked"],
            "never-allowed",
        ),
    ],
)
def test_policy_set_bad_input(state: Path, secret_file: Path, args: list[str], text: str) -> None:
    res = run("policy", "set", *args, "--state", str(state), "--secret-file", str(secret_file))
    assert_fails(res, 2, text)


def test_policy_file_cannot_set_key_version(state: Path, secret_file: Path, tmp_path: Path) -> None:
    doc = tmp_path / "p.json"
    doc.write_text(json.dumps({"key_version": 7}))
    res = run(
        "policy",
        "set",
        APP,
        "--state",
        str(state),
        "--secret-file",
        str(secret_file),
        "--file",
        str(doc),
    )
    assert_fails(res, 2, "policy rotate")


def test_retire_version(state: Path, secret_file: Path, tmp_path: Path) -> None:
    """Retire a rotated-out version: `show` lists the live ones, `set` keeps the retirement,
    and the current, future, retired-again or malformed versions are refused (exit 2)."""
    common = ["--state", str(state), "--secret-file", str(secret_file)]
    assert (
        run("policy", "set", APP, *common, "--simulated", "--compose-hash", COMPOSE).returncode == 0
    )
    assert_fails(run("policy", "retire-version", APP, "1", *common), 2, "rotate' first")
    for _ in range(2):
        assert run("policy", "rotate", APP, *common).returncode == 0
    res = run("policy", "retire-version", APP, "1", *common, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {
        "ok": True,
        "app_id": APP,
        "retired": 1,
        "live_key_versions": [2, 3],
    }
    shown = json.loads(run("policy", "show", APP, *common, "--json").stdout)["policies"][0]
    assert shown["retired_versions"] == [1] and shown["live_key_versions"] == [2, 3]
    text = run("policy", "show", APP, *common).stdout
    assert '"live_key_versions": [\n    2,\n    3\n  ]' in text, text
    res = run("policy", "set", APP, *common, "--simulated", "--compose-hash", COMPOSE, "--json")
    assert json.loads(res.stdout)["policy"]["retired_versions"] == [1]  # replacing keeps it
    assert_fails(run("policy", "retire-version", APP, "3", *common), 2, "rotate' first")
    assert_fails(run("policy", "retire-version", APP, "4", *common), 2, "does not exist")
    assert_fails(run("policy", "retire-version", APP, "1", *common), 2, "already retired")
    assert_fails(run("policy", "retire-version", APP, "0", *common), 2, "N")
    assert_fails(run("policy", "retire-version", APP, "x", *common), 2, "N")
    assert_fails(run("policy", "retire-version", "e6" * 20, "1", *common), 2, "no policy")
    doc = tmp_path / "p.json"
    doc.write_text(json.dumps({"retired_versions": []}))
    res = run("policy", "set", APP, *common, "--file", str(doc))
    assert_fails(res, 2, "policy retire-version")


def test_missing_state_file(tmp_path: Path, secret_file: Path) -> None:
    res = run("info", "--state", str(tmp_path / "none.db"), "--secret-file", str(secret_file))
    assert_fails(res, 2, "does not exist")


def test_serve_on_a_busy_port(state: Path, secret_file: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run(
            "serve", "--state", str(state), "--secret-file", str(secret_file), "--port", str(port)
        )
    assert_fails(res, 2, "cannot listen")


def test_help_for_every_command() -> None:
    from click.testing import CliRunner

    from sealfs.cli import main

    runner = CliRunner()
    for cmd in (
        [],
        ["init"],
        ["serve"],
        ["info"],
        ["policy"],
        ["policy", "set"],
        ["policy", "show"],
        ["policy", "remove"],
        ["policy", "rotate"],
        ["policy", "retire-version"],
    ):
        res = runner.invoke(main, ["kms", *cmd, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output and len(res.output) > 200, cmd
