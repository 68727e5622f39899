"""Command-line options that name a credential, shared by every command that unlocks."""

from __future__ import annotations

import functools
import getpass
import hashlib
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sealfs.crypto import Secret
from sealfs.errors import SealfsError, UsageError
from sealfs.volume.header import (
    Credential,
    KmsCredential,
    PassphraseCredential,
    load_header,
    read_key_file,
)

DEV_COMPOSE_HASH = hashlib.sha256(b"sealfs-dev").digest()


def kms_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --kms / --app-id / --attester / --compose-hash / --kms-deadline to a command."""
    options = [
        click.option("--kms", "kms_url", metavar="URL",
                     help="Unlock through the KMS at URL (http://host:port): this CVM proves "
                          "itself with a quote and receives the app key. Also checks and "
                          "advances the volume's freshness anchor."),
        click.option("--app-id", metavar="HEX",
                     help="App id to request keys for (default: the one in the volume's kms "
                          "slot)."),
        click.option("--attester", type=click.Choice(["tdx", "simulated"]), default="tdx",
                     show_default=True,
                     help="Quote source: 'tdx' (configfs-tsm) or 'simulated' (development "
                          "only; the KMS must run with --allow-simulated)."),
        click.option("--compose-hash", metavar="HEX",
                     help="Simulated attester only: the compose hash this fake CVM measures "
                          "(default: sha256 of 'sealfs-dev')."),
        click.option("--kms-deadline", default=60.0, show_default=True,
                     help="Seconds to keep retrying an unreachable KMS before failing."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def credential_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --key-file / --passphrase-file / --passphrase and the KMS options to a command.
    The wrapped function receives ``cred`` (and ``kms_client`` when --kms was given)."""

    @kms_options
    @click.option("--key-file", type=click.Path(dir_okay=False),
                  help="Unlock with this key file (mode 0600, at least 32 random bytes).")
    @click.option("--passphrase-file", type=click.Path(dir_okay=False),
                  help="Unlock with the recovery passphrase stored in this file (mode 0600; "
                       "one line, trailing newline ignored).")
    @click.option("--passphrase", "ask_passphrase", is_flag=True,
                  help="Unlock with the recovery passphrase, asked on the terminal (or read "
                       "as one line from standard input when it is not a terminal).")
    @functools.wraps(fn)
    def wrapper(*args: Any, key_file: str | None, passphrase_file: str | None,
                ask_passphrase: bool, kms_url: str | None, app_id: str | None,
                attester: str, compose_hash: str | None, kms_deadline: float,
                **kwargs: Any) -> Any:
        if kms_url:
            if key_file or passphrase_file or ask_passphrase:
                raise UsageError("give either --kms or a key file/passphrase, not both")
            backing = kwargs.get("backing_dir")
            kwargs["cred"] = KmsCredential(kms_client(
                kms_url, app_id or _slot_app_id(backing), attester, compose_hash,
                kms_deadline))
        else:
            kwargs["cred"] = resolve_credential(key_file, passphrase_file, ask_passphrase)
        return fn(*args, **kwargs)

    return wrapper


def kms_client(url: str, app_id: str | None, attester: str, compose_hash: str | None,
               deadline: float) -> Any:
    """A KMS client for this CVM, with the chosen quote source."""
    from sealfs.kms.client import KmsClient

    if not app_id:
        raise UsageError("--kms needs --app-id (or a volume whose kms slot names it)")
    try:
        app = bytes.fromhex(app_id)
        compose = bytes.fromhex(compose_hash) if compose_hash else DEV_COMPOSE_HASH
    except ValueError:
        raise UsageError("--app-id and --compose-hash must be hex") from None
    if attester == "simulated":
        from sealfs.attest.simulated import SimulatedAttester

        quoter: Any = SimulatedAttester(app, compose)
    else:
        if compose_hash:
            raise UsageError("--compose-hash only applies to --attester simulated; a real "
                             "CVM's compose hash is measured at boot")
        from sealfs.attest.configfs_tsm import ConfigfsTsmAttester

        quoter = ConfigfsTsmAttester()
    return KmsClient(url, app, quoter, deadline_s=deadline)


def _slot_app_id(backing: str | None) -> str | None:
    if not backing:
        return None
    try:
        slot = load_header(Path(backing)).kms_slot()
    except SealfsError:
        return None
    return slot.kms["app_id"] if slot is not None and slot.kms else None


def resolve_credential(key_file: str | None, passphrase_file: str | None,
                       ask_passphrase: bool, confirm: bool = False) -> Credential:
    given = [x for x in (key_file, passphrase_file, ask_passphrase) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of --key-file, --passphrase-file, --passphrase")
    if key_file:
        return read_key_file(key_file)
    if passphrase_file:
        return PassphraseCredential(read_passphrase_file(passphrase_file))
    return PassphraseCredential(prompt_passphrase(confirm))


def read_passphrase_file(path: str) -> Secret:
    """Read a passphrase file under the same permission rule as key files."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"cannot read passphrase file {path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise UsageError(f"passphrase file {path} is accessible by group or others "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
    with open(path, "rb") as f:
        data = f.read().rstrip(b"\r\n")
    return _checked(data)


def prompt_passphrase(confirm: bool) -> Secret:
    if sys.stdin.isatty():
        first = getpass.getpass("Passphrase: ").encode()
        if confirm and getpass.getpass("Repeat passphrase: ").encode() != first:
            raise UsageError("the passphrases do not match")
        return _checked(first)
    line = sys.stdin.buffer.readline().rstrip(b"\r\n")
    return _checked(line)


def _checked(data: bytes) -> Secret:
    if len(data) < 8:
        raise UsageError("a passphrase must be at least 8 characters long")
    return Secret(data)


