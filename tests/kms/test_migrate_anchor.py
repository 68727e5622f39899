"""`sealfs migrate` through a real KMS on 127.0.0.1: the import unlocks through the KMS and
checks the freshness anchor, so an older bundle of the same volume (a stale export) is refused,
and once the imported copy commits, a mount or check of the old copy is refused (exit 5) as a stale
copy left behind by the migration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Volume, sealfs

from .conftest import KmsProcess
from .test_volume_anchor import kmount, kms_args, kvol  # noqa: F401 - fixture

pytestmark = pytest.mark.mount


def test_stale_bundle_refused_and_old_copy_forks(
    tmp_path: Path,
    kvol: Volume,  # noqa: F811 - fixture
    kms: KmsProcess,
) -> None:
    kmount(kvol, kms)
    (kvol.mnt / "f").write_text("version 1")
    kvol.umount()
    old = tmp_path / "bundle-old"
    sealfs("migrate", "export", str(kvol.backing), str(old), "--final", *kms_args(kms))

    kmount(kvol, kms)
    (kvol.mnt / "f").write_text("version 2")
    kvol.umount()  # the anchor moves past the old bundle
    new = Volume(tmp_path / "b-backing", kvol.key, tmp_path / "b-mnt", tmp_path / "b.log")
    new.mnt.mkdir()
    res = sealfs("migrate", "import", str(old), str(new.backing), *kms_args(kms), check=False)
    assert res.returncode == 5 and "stale export" in res.stderr, res.stderr
    assert not new.backing.exists()

    fresh = tmp_path / "bundle"
    sealfs("migrate", "export", str(kvol.backing), str(fresh), "--final", *kms_args(kms))
    out = sealfs("migrate", "import", str(fresh), str(new.backing), *kms_args(kms), "--json").stdout
    assert json.loads(out)["ok"]
    kmount(new, kms)
    try:
        assert (new.mnt / "f").read_text() == "version 2"
        (new.mnt / "g").write_text("written on the new host")
    finally:
        new.umount()
    sealfs("check", str(new.backing), *kms_args(kms))
    # the old copy is now behind the anchor: named stale, left behind by the migration
    res = kmount(kvol, kms, check=False)
    assert res.returncode == 5 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    for words in ("stale", "old copy left behind", "a fork", "migration"):
        assert words in res.stderr, res.stderr
    res = sealfs("check", str(kvol.backing), *kms_args(kms), "--json", check=False)
    (finding,) = json.loads(res.stdout)["findings"]
    assert res.returncode == 5 and finding["kind"] == "rolled-back", res.stdout
    assert "old copy left behind" in finding["detail"] and "migration" in finding["detail"]
