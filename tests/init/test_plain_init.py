"""tools/sealfs-init, the entry point for init systems without systemd: it runs the real
`sealfs init up`, logs what it said with timestamps (to stderr and its log file) and passes
its exit status on, so that the caller can stop the boot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "tools" / "sealfs-init"


def test_passes_the_failure_of_init_up_on(tmp_path: Path) -> None:
    command = tmp_path / "sealfs"
    command.write_text(f'#!/bin/sh\ncd {REPO} && exec {sys.executable} -m sealfs "$@"\n')
    command.chmod(0o755)
    log = tmp_path / "log" / "init.log"
    res = subprocess.run(
        ["sh", str(SCRIPT), str(tmp_path / "missing.toml")],
        capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "SEALFS": str(command), "SEALFS_INIT_LOG": str(log)},
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    logged = log.read_text().splitlines()
    assert logged == res.stderr.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ sealfs-init: ", line) for line in logged)
    assert logged[0].endswith(f"bringing up the volumes of {tmp_path / 'missing.toml'}")
    assert logged[-1].endswith("sealfs init up failed (exit 2): the app must not start")
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_says_when_sealfs_is_missing(tmp_path: Path) -> None:
    res = subprocess.run(
        ["sh", str(SCRIPT)], capture_output=True, text=True, check=False, timeout=60,
        env={"PATH": "/usr/bin:/bin", "SEALFS": "no-such-sealfs",
             "SEALFS_INIT_LOG": str(tmp_path / "init.log")},
    )  # fmt: skip
    assert res.returncode == 127
    assert "cannot find the sealfs command (no-such-sealfs): set SEALFS" in res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_is_clean() -> None:
    scripts = [SCRIPT, *sorted((REPO / "tools" / "vm").glob("*.sh"))]
    res = subprocess.run(
        ["shellcheck", "-x", "--severity=warning", *map(str, scripts)],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout
