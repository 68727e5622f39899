"""Device-mapper tests: run where the kernel has dm-crypt, i.e. inside the test VM.

On a kernel without device-mapper the whole directory is skipped; tests/luks/test_vm.py boots
the qemu VM (tools/vm/) and runs this directory there, reporting each test's result.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealfs.luks.cryptsetup import device_mapper_available, mapping_status
from sealfs.luks.fs import mountpoints_of

SKIP_REASON = (
    "no device-mapper in this kernel: these tests run inside the qemu VM (tests/luks/test_vm.py)"
)
HAVE_DM = device_mapper_available()


def cleanup_mapping(name: str) -> None:
    """What a reboot does to a mapping a crashed process left behind."""
    mapper = f"/dev/mapper/{name}"
    for mnt in mountpoints_of(mapper):
        subprocess.run(["umount", mnt], check=False, capture_output=True)
    if mapping_status(name) is not None:
        subprocess.run(["cryptsetup", "close", name], check=False, capture_output=True)
    drop_caches()


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@pytest.fixture
def mapping_names() -> Iterator[list[str]]:
    """Names a test maps; whatever is still open afterwards is torn down."""
    names: list[str] = []
    yield names
    for name in names:
        cleanup_mapping(name)
