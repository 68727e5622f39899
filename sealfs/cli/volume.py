"""``sealfs create`` and ``sealfs info``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sealfs.cli.credentials import (
    KmsOptions,
    kms_client,
    kms_options,
    prompt_passphrase,
    read_passphrase_file,
)
from sealfs.cli.output import emit, json_option
from sealfs.crypto import KdfParams
from sealfs.errors import UsageError
from sealfs.fs.lifecycle import DEFAULT_BLOCK_SIZE, create_volume
from sealfs.volume.header import (
    Credential,
    KmsCredential,
    PassphraseCredential,
    load_header,
    read_key_file,
)
from sealfs.volume.header import (
    new_key_file as generate_key_file,
)

SIZE_SUFFIXES = {"k": 1024, "m": 1024 * 1024}


def parse_size(text: str) -> int:
    t = text.strip().lower().rstrip("ib")
    mult = SIZE_SUFFIXES.get(t[-1:], 1)
    try:
        return int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise UsageError(f"not a size: {text!r} (examples: 131072, 128K, 1M)") from None


def kdf_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --kdf / --kdf-memory / --kdf-iterations (the cost of a new passphrase slot) to a
    command. The wrapped function receives ``kdf_params``."""

    @click.option(
        "--kdf",
        type=click.Choice(["argon2id", "scrypt"]),
        default="argon2id",
        show_default=True,
        help="Passphrase KDF of a new recovery-passphrase slot.",
    )
    @click.option(
        "--kdf-memory",
        default="64M",
        show_default=True,
        help="Memory cost of the passphrase KDF (e.g. 64M, 1G).",
    )
    @click.option(
        "--kdf-iterations", default=3, show_default=True, help="Time cost (passes) of argon2id."
    )
    @functools.wraps(fn)
    def wrapper(*args: Any, kdf: str, kdf_memory: str, kdf_iterations: int, **kwargs: Any) -> Any:
        kwargs["kdf_params"] = KdfParams.default(
            kdf, memory_kib=parse_size(kdf_memory) // 1024, iterations=kdf_iterations
        )
        return fn(*args, **kwargs)

    return wrapper


@click.command()
@click.argument("backing_dir", type=click.Path(file_okay=False))
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False),
    help="Add a key-file slot unlocked by this existing file (mode 0600, at least "
    "32 random bytes).",
)
@click.option(
    "--new-key-file",
    type=click.Path(dir_okay=False),
    help="Generate a fresh random key file at this path (mode 0600) and add a slot "
    "for it. Refuses to overwrite an existing file.",
)
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False),
    help="Add a recovery-passphrase slot with the passphrase in this file (0600).",
)
@click.option(
    "--passphrase",
    "ask_passphrase",
    is_flag=True,
    help="Add a recovery-passphrase slot; asks twice on a terminal, else reads one "
    "line from standard input.",
)
@kms_options
@kdf_options
@click.option(
    "--compression",
    type=click.Choice(["none", "lz4"]),
    default="none",
    show_default=True,
    help="Compress blocks with lz4 before sealing. Leaks how compressible each "
    "block is through its size (see docs/threat-model.md).",
)
@click.option(
    "--block-size",
    default=str(DEFAULT_BLOCK_SIZE),
    show_default=True,
    help="Block size: a power of two from 4K to 4M.",
)
@json_option
def create(
    backing_dir: str,
    key_file: str | None,
    new_key_file: str | None,
    passphrase_file: str | None,
    ask_passphrase: bool,
    kdf_params: KdfParams,
    compression: str,
    block_size: str,
    kms: KmsOptions,
    as_json: bool,
) -> None:
    """Create a new sealed volume in BACKING_DIR (an empty or absent directory).

    A random volume id and master key are generated; the master key is wrapped in one key
    slot per credential given (at least one): key files for machines, a passphrase for
    recovery by people, and a KMS slot (--kms URL --app-id HEX) whose key the KMS releases
    only to an attested CVM running that app.

    \b
    Examples:
      sealfs create /data/vol --new-key-file /root/vol.key
      sealfs create /data/vol --key-file /root/vol.key --passphrase --compression lz4
      sealfs create /data/vol --kms http://127.0.0.1:8750 --app-id 0a1b... --passphrase
    """
    creds: list[tuple[Credential, KdfParams | None]] = []
    if kms.url:
        creds.append((KmsCredential(kms_client(kms)), None))
    if key_file:
        creds.append((read_key_file(key_file), None))
    if new_key_file:
        creds.append((generate_key_file(new_key_file), None))
    if passphrase_file or ask_passphrase:
        secret = (
            read_passphrase_file(passphrase_file)
            if passphrase_file
            else prompt_passphrase(confirm=True)
        )
        creds.append((PassphraseCredential(secret), kdf_params))
    header = create_volume(Path(backing_dir), creds, parse_size(block_size), compression)
    info = header.public_info()
    emit(
        {"ok": True, **info},
        as_json,
        f"created volume {info['uuid']} in {backing_dir} "
        f"({len(info['slots'])} key slot(s), block size {header.block_size}, "
        f"compression {header.compression})",
    )


@click.command()
@click.argument("backing_dir", type=click.Path(file_okay=False))
@json_option
def info(backing_dir: str, as_json: bool) -> None:
    """Show a volume's public header: format version, ids, slots and sizes — never keys.

    Reads only the header; no credential is needed. The header's authenticity is checked
    when the volume is unlocked (mount, check), not here.
    """
    header = load_header(Path(backing_dir))
    data = header.public_info()
    lines = [
        f"volume:        {data['uuid']}",
        f"format:        sealfs v{data['format_version']}",
        f"cipher:        {data['cipher']}",
        f"block size:    {data['block_size']}",
        f"compression:   {data['compression']}",
        f"key slots:     {len(data['slots'])}",
    ]
    lines += [f"  slot {s['id']}: {s['type']}" for s in data["slots"]]
    if data["rekey_in_progress"]:
        lines.append("rekey:         in progress (run `sealfs rekey` again to finish it)")
    emit({"ok": True, **data}, as_json, "\n".join(lines))
