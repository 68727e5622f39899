"""The ``sealfs`` command line.

Each command group lives in its own module and is registered here. This package is the only
place that maps :class:`sealfs.errors.SealfsError` to exit codes and prints results; the
library below it raises and returns, never prints.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import resource

import click

from sealfs import __version__

from .output import SealfsGroup

# (module, attribute) of each top-level command; imported lazily so that a command which needs
# pyfuse3 or trio does not slow down or break the others.
COMMANDS = {
    "create": ("sealfs.cli.volume", "create"),
    "info": ("sealfs.cli.volume", "info"),
    "mount": ("sealfs.cli.mount", "mount"),
    "umount": ("sealfs.cli.mount", "umount"),
    "check": ("sealfs.cli.check", "check"),
    "attest": ("sealfs.cli.attest", "attest"),
    "luks": ("sealfs.cli.luks", "luks"),
    "kms": ("sealfs.cli.kms", "kms"),
    "key": ("sealfs.cli.key", "key"),
    "migrate": ("sealfs.cli.migrate", "migrate"),
    "demo": ("sealfs.cli.demo", "demo"),
    "init": ("sealfs.cli.init", "init"),
}


class LazyGroup(SealfsGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, (mod, _) in COMMANDS.items() if _available(mod))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None or not _available(target[0]):
            return None
        command: click.Command = getattr(importlib.import_module(target[0]), target[1])
        return command


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sealfs")
def main() -> None:
    """sealfs: encrypted, authenticated, rollback-aware storage for confidential VMs.

    A sealfs volume lives in an untrusted backing directory. Everything in it (file contents,
    names, symlink targets, xattrs, the directory tree) is sealed with AES-256-GCM under a
    volume master key that is itself wrapped in key slots (key file, recovery passphrase, KMS).

    Exit codes: 0 success, 1 internal error, 2 usage, 3 cannot unlock, 4 bad or unsupported
    header, 5 integrity violation found, 6 busy, 7 storage failure, 8 KMS, 9 attestation,
    10 LUKS.
    """
    forbid_core_dumps()


PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    """Keep keys out of core files and away from same-user debuggers: every sealfs process
    (mount daemon, check, KMS, ...) may hold a master or root key in memory. Done first thing,
    before any credential is read. Forked children (check workers) inherit both; exec resets
    the dumpable flag, so the mount daemon, itself ``sealfs mount``, sets it again here."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
