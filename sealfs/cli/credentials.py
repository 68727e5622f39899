"""Command-line options that name a credential, shared by every command that unlocks."""

from __future__ import annotations

import functools
import getpass
import os
import stat
import sys
from collections.abc import Callable
from typing import Any

import click

from sealfs.crypto import Secret
from sealfs.errors import UsageError
from sealfs.volume.header import (
    Credential,
    KeyFileCredential,
    PassphraseCredential,
    read_key_file,
)


def credential_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --key-file / --passphrase-file / --passphrase to a command."""

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
                ask_passphrase: bool, **kwargs: Any) -> Any:
        kwargs["cred"] = resolve_credential(key_file, passphrase_file, ask_passphrase)
        return fn(*args, **kwargs)

    return wrapper


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


def describe(cred: Credential) -> str:
    return "key file" if isinstance(cred, KeyFileCredential) else "passphrase"
