"""Run tests/luks/dm inside a qemu VM whose kernel has device-mapper, and report each test.

This machine's kernel has no device-mapper, so ``cryptsetup open`` cannot map anything here.
tools/vm/ boots Debian's kernel under software emulation with the host's root file system
shared read-only (same cryptsetup, mkfs, Python and sealfs) and one blank virtio disk; the VM
runs ``pytest tests/luks/dm`` once, and every test function there gets its verdict here. The
first run downloads the kernel package (about 70 MB) and builds the initramfs; later runs reuse
it from $SEALFS_VM_CACHE (default /var/cache/sealfs-vm).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sealfs.luks.cryptsetup import device_mapper_available

from .conftest import REPO, new_image

DM_TESTS = REPO / "tests" / "luks" / "dm"
VM_TIMEOUT = 840


def _inner_tests() -> list[str]:
    names = []
    for path in sorted(DM_TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        names += [
            n.name
            for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
        ]
    return names


def _why_not() -> str | None:
    if device_mapper_available():
        return "this kernel has device-mapper: tests/luks/dm runs directly, no VM needed"
    for tool, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("dpkg-deb", "dpkg"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install {package})"
    return None


@dataclass
class VmRun:
    returncode: int
    output: str
    results: dict[str, tuple[str, str]] = field(default_factory=dict)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def _parse_junit(path: Path) -> dict[str, tuple[str, str]]:
    results: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.text or child.get("message") or "")
            elif child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        results[case.get("name", "?")] = (outcome, message)
    return results


@pytest.fixture(scope="session")
def vm_run(tmp_path_factory: pytest.TempPathFactory) -> VmRun:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("vm")
    work = base / "work"
    disk = new_image(base / "vda.img", 32 * 1024 * 1024)
    job = base / "job.sh"
    job.write_text(
        "set -e\n"
        f"cd {REPO}\n"
        "export PYTHONDONTWRITEBYTECODE=1 SEALFS_VM_DISK=/dev/vda\n"
        f"exec {sys.executable} -m pytest -q -rs -p no:cacheprovider --basetemp /run/tmp/pytest "
        f"--rootdir {REPO} --confcutdir {REPO / 'tests' / 'luks'} "
        f"--junitxml=/run/sealfs-vm/junit.xml {DM_TESTS}\n"
    )
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "tools" / "vm" / "run.sh"),
            "--timeout",
            str(VM_TIMEOUT),
            "--disk",
            str(disk),
            "--work",
            str(work),
            str(job),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=VM_TIMEOUT + 300,
    )
    run = VmRun(proc.returncode, proc.stdout + proc.stderr)
    junit = work / "junit.xml"
    if junit.exists():
        run.results = _parse_junit(junit)
    return run


@pytest.mark.timeout(VM_TIMEOUT + 400)
@pytest.mark.parametrize("name", _inner_tests())
def test_in_vm(vm_run: VmRun, name: str) -> None:
    """The verdict of tests/luks/dm/<name> (all its parameter sets), run inside the VM."""
    cases = {k: v for k, v in vm_run.results.items() if k == name or k.startswith(name + "[")}
    if not cases:
        pytest.fail(f"{name} did not run in the VM (exit {vm_run.returncode}):\n{vm_run.tail()}")
    failed = {k: msg for k, (outcome, msg) in cases.items() if outcome == "failed"}
    if failed:
        detail = "\n\n".join(f"{k}:\n{msg}" for k, msg in failed.items())
        pytest.fail(f"failed inside the VM:\n{detail}")
    if all(outcome == "skipped" for outcome, _ in cases.values()):
        pytest.skip("skipped inside the VM: " + next(iter(cases.values()))[1])
