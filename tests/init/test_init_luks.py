"""LUKS volumes in the init volume list, on a host without device-mapper: everything up to
the open runs for real (device state, strict header validation, the KMS key against key slot
0); the open itself, mkfs and mount are tested inside the VM (make vm-test)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from sealfs.luks.cryptsetup import device_mapper_available
from tests.init.conftest import Cvm
from tests.luks.conftest import sealfs_cli
from tests.luks.test_kms import kms_args

if shutil.which("cryptsetup", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
    pytest.skip("cryptsetup is not installed (package cryptsetup-bin)", allow_module_level=True)
if device_mapper_available():
    pytest.skip(
        "device-mapper is available: these tests check the failure before the open",
        allow_module_level=True,
    )

IMAGE_SIZE = 32 * 1024 * 1024


def image(cvm: Cvm, name: str, content: bytes = b"") -> Path:
    path = cvm.root / f"{name}.img"
    with open(path, "wb") as f:
        f.write(content)
        f.truncate(IMAGE_SIZE)
    return path


def kms_format(cvm: Cvm, path: Path, volume_id: str) -> None:
    """Format as a CVM of app A would, for the KMS key of ``volume_id``."""
    res = sealfs_cli("luks", "format", str(path), *kms_args(cvm.kms, volume=volume_id))
    assert res.returncode == 0, res.stderr


def digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def test_a_valid_kms_volume_is_validated_up_to_the_open(cvm: Cvm) -> None:
    """The header passes, the KMS key opens slot 0; the open needs device-mapper. The
    sealfs volume mounted before it is unmounted again."""
    cvm.add("data")
    img = image(cvm, "db")
    kms_format(cvm, img, "db")
    before = digest(img)
    cvm.add_luks("db", img)
    res = cvm.init("up")
    assert res.returncode == 10, res.stderr
    assert "sealfs: error: volume db: device-mapper is not available" in res.stderr
    assert "volume data: unmounted again" in res.stderr
    assert cvm.mounted() == [] and digest(img) == before


def test_a_volume_formatted_for_another_binding_is_refused_before_the_open(cvm: Cvm) -> None:
    img = image(cvm, "db")
    kms_format(cvm, img, "not-db")  # the KMS key of another volume
    cvm.add_luks("db", img)
    res = cvm.init("up")
    assert res.returncode == 3, res.stderr
    assert "sealfs: error: volume db: key check: no key slot opened" in res.stderr


def test_foreign_data_is_never_formatted(cvm: Cvm) -> None:
    img = image(cvm, "db", os.urandom(4096))
    before = digest(img)
    cvm.add_luks("db", img)
    res = cvm.init("up")
    assert res.returncode == 10 and "refusing to format over it" in res.stderr, res.stderr
    assert digest(img) == before


def test_a_blank_device_with_create_never_is_left_alone(cvm: Cvm) -> None:
    img = image(cvm, "db")
    cvm.add_luks("db", img, create="never")
    res = cvm.init("up")
    assert res.returncode == 4, res.stderr
    assert res.stderr.strip().endswith(
        f'volume db: {img} is not formatted yet, and create = "never"'
    )
    assert digest(img) == digest(image(cvm, "blank"))
