"""``sealfs init``: what a confidential VM's init runs to bring its volumes up at boot."""

from __future__ import annotations

import click

from sealfs.cli.init_serve import serve_volume
from sealfs.cli.init_units import install_units
from sealfs.cli.output import SealfsGroup


@click.group(cls=SealfsGroup)
def init() -> None:
    """Bring the volumes of /etc/sealfs/volumes.toml up at boot (docs/init.md)."""


init.add_command(install_units)
init.add_command(serve_volume)
