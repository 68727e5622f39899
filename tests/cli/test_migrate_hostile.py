"""`sealfs migrate` against a host that changes things between a check and a use: the header
replaced by a concurrent `sealfs key` command during an export, names planted in a bundle or
staging directory while a copy runs. Real volumes, the real command line for the concurrent
change; the change is made at a named step of the export (its progress notes), never timed."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from sealfs.meter import NoMeter
from sealfs.migrate.export import export_stream, export_volume
from sealfs.migrate.importer import ImportOptions, import_bundle, import_stream, staging_dir
from sealfs.migrate.manifest import BundleTampered
from sealfs.volume.header import read_key_file
from tests.conftest import Volume, new_volume, sealfs
from tests.mount.test_header_change import key_file

HEADER = "sealfs.header"


class _KeyAddDuringExport(NoMeter):
    """Progress that runs a real `sealfs key add` on the volume when the export starts to
    read its metadata: after it unlocked the header, before it copied it."""

    def __init__(self, vol: Volume, new_key: Path) -> None:
        self.vol, self.new_key, self.done = vol, new_key, False

    def note(self, phase: str) -> None:
        if phase == "reading metadata" and not self.done:
            self.done = True
            _add_key_slot(self.vol, self.new_key)


def _add_key_slot(vol: Volume, new_key: Path) -> None:
    """A real `sealfs key add`: the header replaced under the header lock."""
    sealfs(
        "key", "add", str(vol.backing), "--key-file", str(vol.key), "--new-key-file", str(new_key)
    )


@pytest.mark.parametrize("to", ["directory", "stream"])
def test_export_carries_the_header_it_unlocked_not_one_replaced_meanwhile(
    tmp_path: Path, to: str
) -> None:
    vol = new_volume(tmp_path)
    unlocked = (vol.backing / HEADER).read_bytes()
    meter = _KeyAddDuringExport(vol, key_file(tmp_path / "second-key"))
    cred = read_key_file(vol.key)
    if to == "directory":
        dest = tmp_path / "bundle"
        export_volume(vol.backing, dest, cred, final=True, dry_run=False, meter=meter)
        carried = (dest / HEADER).read_bytes()
    else:
        out = io.BytesIO()
        export_stream(vol.backing, out, cred, dry_run=False, meter=meter)
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
            member = tar.extractfile(HEADER)
            assert member is not None
            carried = member.read()
        dest = tmp_path / "unpacked"
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
            tar.extractall(dest, filter="data")
    assert meter.done
    assert (vol.backing / HEADER).read_bytes() != unlocked  # the key add happened
    assert carried == unlocked
    target = tmp_path / "imported"
    import_bundle(dest, target, cred, ImportOptions())
    assert (target / HEADER).read_bytes() == unlocked


def test_fifo_planted_at_a_part_name_in_the_bundle_does_not_hang_the_export(
    tmp_path: Path,
) -> None:
    """The bundle directory is the host's; opening a FIFO for writing blocks until a reader
    comes, so a ``.part`` name is unlinked and created anew, never opened as found."""
    vol = new_volume(tmp_path)
    dest = tmp_path / "bundle"
    dest.mkdir()
    for name in (".sealfs.header.part", ".checkpoint.part"):
        os.mkfifo(dest / name)
    sealfs(  # the timeout only detects the hang the planted FIFOs caused
        "migrate",
        "export",
        str(vol.backing),
        str(dest),
        "--final",
        "--key-file",
        str(vol.key),
        timeout=120,
    )
    assert not any(p.name.endswith(".part") for p in dest.iterdir())
    target = tmp_path / "imported"
    import_bundle(dest, target, read_key_file(vol.key), ImportOptions())
    assert (target / HEADER).read_bytes() == (vol.backing / HEADER).read_bytes()


class _SwapsStagedHeader(io.BytesIO):
    """A stream that, once the importer has taken the header member and starts on the
    next one, puts ``older`` (an authentic earlier header of the same volume) in place of
    the header it staged: the host's staging directory changing between write and use."""

    def __init__(self, data: bytes, stage: Path, older: bytes, after: int) -> None:
        super().__init__(data)
        self.stage, self.older, self.after, self.swapped = stage, older, after, False

    def read(self, n: int | None = -1, /) -> bytes:
        if not self.swapped and self.tell() >= self.after:
            self.swapped = True
            planted = self.stage / "planted"
            planted.write_bytes(self.older)
            planted.rename(self.stage / HEADER)
        return super().read(n)


def test_stream_import_uses_the_header_it_received_not_one_swapped_in_staging(
    tmp_path: Path,
) -> None:
    vol = new_volume(tmp_path)
    older = (vol.backing / HEADER).read_bytes()
    _add_key_slot(vol, key_file(tmp_path / "second-key"))
    cred = read_key_file(vol.key)
    out = io.BytesIO()
    export_stream(vol.backing, out, cred, dry_run=False)
    header_len = len((vol.backing / HEADER).read_bytes())
    target = tmp_path / "imported"
    stream = _SwapsStagedHeader(
        out.getvalue(), staging_dir(target), older, 512 + header_len + -header_len % 512
    )
    with pytest.raises(BundleTampered, match="changed while it was imported"):
        import_stream(stream, target, cred, ImportOptions())
    assert stream.swapped and not target.exists()


def test_directory_planted_at_the_manifest_name_is_a_one_line_error(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    dest = tmp_path / "bundle"
    (dest / "sealfs-migrate.manifest").mkdir(parents=True)
    res = sealfs(
        "migrate", "export", str(vol.backing), str(dest), "--final", "--key-file", str(vol.key),
        check=False,
    )  # fmt: skip
    assert res.returncode == 7 and res.stderr.count("\n") == 1, res.stderr
    assert "cannot remove" in res.stderr and "Is a directory" in res.stderr
