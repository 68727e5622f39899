"""What an install must provide: the patched pyfuse3, or a mount that refuses to start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from sealfs.fuse.mount import require_patched_pyfuse3

REPO = Path(__file__).resolve().parents[2]

# The stock PyPI pyfuse3: the patched build's fallocate handler taken away, then the CLI run.
_STOCK_PYFUSE3 = """
import sys
import pyfuse3
del pyfuse3.Operations.fallocate
from sealfs.cli import main
main(sys.argv[1:])
"""


def test_pyproject_pins_the_release_the_patches_apply_to() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    script = (REPO / "tools" / "install-pyfuse3.sh").read_text()
    version = re.search(r"^VERSION=(\S+)$", script, re.M)
    assert version is not None
    assert f"pyfuse3=={version.group(1)}" in deps


def test_the_installed_pyfuse3_is_the_patched_one() -> None:
    require_patched_pyfuse3()


def test_mount_refuses_a_pyfuse3_without_fallocate(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(64))
    key.chmod(0o600)
    (tmp_path / "mnt").mkdir()
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            _STOCK_PYFUSE3,
            "mount",
            str(tmp_path),
            str(tmp_path / "mnt"),
            "--foreground",
            "--key-file",
            str(key),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert res.returncode == 1, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "tools/install-pyfuse3.sh" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
