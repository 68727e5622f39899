"""Unit and core tests need no FUSE: they run where pyfuse3 cannot be imported.

The root conftest.py is loaded for every test; if it (or anything a unit or core test imports)
imported pyfuse3, a developer without the patched pyfuse3 could not run the fast tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: pytest in a child where ``import pyfuse3`` fails (a None entry in sys.modules blocks it).
_WITHOUT_PYFUSE3 = """
import sys
sys.modules["pyfuse3"] = None
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


def test_unit_and_core_tests_run_without_pyfuse3() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            _WITHOUT_PYFUSE3,
            "tests/unit/test_formats.py",
            "tests/unit/test_layers.py",
            "tests/core/test_inline.py",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout


def test_the_block_is_real() -> None:
    """The child's block does stop pyfuse3 (or the test above proves nothing)."""
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            'import sys; sys.modules["pyfuse3"] = None; import sealfs.fuse.mount',
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert res.returncode != 0 and "pyfuse3" in res.stderr
