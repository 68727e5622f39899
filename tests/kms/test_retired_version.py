"""A retired key version through a real KMS on 127.0.0.1 and real mounts: a volume whose kms
slot is still on the retired version is refused by the KMS with the reason, and opens with its
recovery key file."""

from __future__ import annotations

import pytest

from tests.conftest import Volume, sealfs

from .conftest import APP_A, KmsProcess, KmsState
from .test_volume_anchor import kmount, kvol  # noqa: F401 - fixture

pytestmark = pytest.mark.mount


def kms_cli(state: KmsState, *args: str) -> None:
    sealfs(
        "kms", "policy", *args, "--state", str(state.path), "--secret-file", str(state.secret_file)
    )


def test_volume_on_a_retired_version_opens_only_with_its_recovery_slot(
    kvol: Volume,  # noqa: F811 - fixture
    kms: KmsProcess,
    state: KmsState,
) -> None:
    kmount(kvol, kms)
    (kvol.mnt / "f").write_text("written under key version 1")
    kvol.umount()
    kms_cli(state, "rotate", APP_A.hex())
    kmount(kvol, kms)  # rotating alone keeps version 1 live
    kvol.umount()
    kms_cli(state, "retire-version", APP_A.hex(), "1")
    res = kmount(kvol, kms, check=False)
    assert res.returncode == 8, res.stderr
    assert "key_version_retired" in res.stderr and "recovery slot" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert "refused retired key v1" in kms.log()
    kvol.mount()  # the recovery key file
    assert (kvol.mnt / "f").read_text() == "written under key version 1"
    kvol.umount()
