"""``sealfs migrate import --verify-data``: decrypt every object of the staged volume.

The manifest proves the bundle holds the bytes the exporter read; it cannot prove those bytes
were sound (an object damaged on the old host's disk is hashed and carried faithfully). This
runs the full ``sealfs check`` on the staged copy — every record and data object
authenticated under the volume key, bound to its file and position — before it is installed.
"""

from __future__ import annotations

from pathlib import Path

from sealfs.check import CheckOptions, check_volume
from sealfs.crypto import Secret
from sealfs.errors import IntegrityError
from sealfs.meter import Meter
from sealfs.store import ObjectStore
from sealfs.volume.header import Header


class BundleDataDamaged(IntegrityError):
    """The bundle matches its manifest, but an object in it does not decrypt or belongs
    elsewhere: it was damaged before the export hashed it."""

    kind = "bundle-data-damaged"


def verify_data(stage: Path, header: Header, master: Secret, meter: Meter) -> None:
    """Check the volume staged in ``stage`` as ``sealfs check`` does; raise BundleDataDamaged
    naming the first problem if it is not clean."""
    store = ObjectStore(stage)
    try:
        report = check_volume(store, header, master, CheckOptions(progress=meter)).report
    finally:
        store.close()
    if report.clean:
        return
    first = report.problems[0]
    where = f"{first.path or '(volume)'} {first.what}" + (
        f" [{first.object}]" if first.object else ""
    )
    raise BundleDataDamaged(
        f"the bundle matches its manifest but its data does not verify: {len(report.problems)} "
        f"problem(s), first {where}: {first.kind}; the copy was damaged on the exporting host "
        "before it was hashed (run `sealfs check` there); nothing was installed"
    )
