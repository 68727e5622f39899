"""Command-line options that name a credential, shared by every command that unlocks."""

from __future__ import annotations

import functools
import getpass
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from sealfs import strict
from sealfs.attest.eventlog import DEFAULT_RUNTIME_LOG
from sealfs.attest.simulated import DEV_COMPOSE_HASH
from sealfs.crypto import Secret
from sealfs.errors import SealfsError, UsageError
from sealfs.kms.client import Attester, KmsClient
from sealfs.volume.header import (
    KeyFileCredential,
    KmsCredential,
    PassphraseCredential,
    load_header,
    parse_volume_id,
    read_key_file,
)

MAX_PASSPHRASE_FILE_BYTES = 4096


@dataclass(frozen=True)
class KmsOptions:
    """What the KMS options of one command say: where the KMS is (None: not used), whom to
    trust, who we are."""

    urls: tuple[str, ...]
    app_id: str | None
    attester: str
    compose_hash: str | None
    device_id: str | None
    deadline: float
    public_keys: tuple[str, ...]
    trust_on_first_use: bool
    event_log: str | None = None
    request_timeout: float = 15.0

    @property
    def url(self) -> str | None:
        """The first KMS URL, or None when the command does not use a KMS."""
        return self.urls[0] if self.urls else None


def kms_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --kms / --kms-public-key / --app-id / --attester / ... to a command.

    The command receives ``kms``: a :class:`KmsOptions`."""

    @click.option(
        "--kms",
        "kms_urls",
        metavar="URL",
        multiple=True,
        help="Unlock through the KMS at URL (http://host:port): this CVM proves "
        "itself with a quote and receives the app key. Also checks and "
        "advances the volume's freshness anchor. Repeat it for each replica of "
        "one KMS (same state): they are tried in order, one that is down, slow "
        "or answers 5xx is skipped, a refusal is final.",
    )
    @click.option(
        "--kms-public-key",
        "kms_public_keys",
        metavar="HEX",
        multiple=True,
        help="Ed25519 public key (64 hex digits) of a KMS this CVM trusts, as "
        "`sealfs kms init` printed it; repeat it for each replica. Answers "
        "signed by any other key are refused. Required with --kms unless this "
        "CVM measured a key-provider event; never taken from the volume.",
    )
    @click.option(
        "--trust-on-first-use",
        is_flag=True,
        help="Development only: trust whatever key the KMS announces (logged as a "
        "warning). A hostile host can redirect the KMS address and answer "
        "with a KMS of its own.",
    )
    @click.option(
        "--app-id",
        metavar="HEX",
        help="App id to request keys for (default: the one in the volume's kms "
        "slot; it must match the app id this CVM attests as).",
    )
    @click.option(
        "--attester",
        type=click.Choice(["tdx", "simulated"]),
        default="tdx",
        show_default=True,
        help="Quote source: 'tdx' (configfs-tsm) or 'simulated' (development "
        "only; the KMS must run with --allow-simulated).",
    )
    @click.option(
        "--compose-hash",
        metavar="HEX",
        help="Simulated attester only: the compose hash this fake CVM measures "
        "(default: sha256 of 'sealfs-dev').",
    )
    @click.option(
        "--device-id",
        metavar="HEX",
        help="Simulated attester only: the device id (32-byte hex) of the host this "
        "fake CVM runs on, as a KMS policy's --device names it (default: a fixed "
        "development id). A real host's comes from its PCK certificate.",
    )
    @click.option(
        "--event-log",
        metavar="FILE",
        help="TDX attester only: the runtime event log that explains this CVM's RTMR3, sent "
        f"to the KMS with each quote (default {DEFAULT_RUNTIME_LOG}; `sealfs init` "
        "passes its configured event_log).",
    )
    @click.option(
        "--kms-deadline",
        default=60.0,
        show_default=True,
        help="Seconds to keep trying the KMS replicas before failing (one deadline "
        "for all of them).",
    )
    @click.option(
        "--kms-timeout",
        type=click.FloatRange(0.2, 600),
        default=15.0,
        show_default=True,
        help="Seconds to wait for one replica's answer before trying the next.",
    )
    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        kms_urls: tuple[str, ...],
        kms_public_keys: tuple[str, ...],
        trust_on_first_use: bool,
        app_id: str | None,
        attester: str,
        compose_hash: str | None,
        device_id: str | None,
        event_log: str | None,
        kms_deadline: float,
        kms_timeout: float,
        **kwargs: Any,
    ) -> Any:
        if not kms_urls and (kms_public_keys or trust_on_first_use):
            raise UsageError("--kms-public-key and --trust-on-first-use need --kms URL")
        if event_log and attester != "tdx":
            raise UsageError("--event-log only applies to --attester tdx")
        kwargs["kms"] = KmsOptions(
            kms_urls,
            app_id,
            attester,
            compose_hash,
            device_id,
            kms_deadline,
            kms_public_keys,
            trust_on_first_use,
            event_log,
            kms_timeout,
        )
        return fn(*args, **kwargs)

    return wrapper


def stream_credential_options(
    argument: str,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:func:`credential_options` for a command whose ``argument`` may be ``-``: standard
    input then carries a byte stream, so --passphrase asks on the terminal, never on stdin."""
    return functools.partial(credential_options, stdin_argument=argument)


def credential_options(
    fn: Callable[..., Any], stdin_argument: str | None = None
) -> Callable[..., Any]:
    """Add --key-file / --passphrase-file / --passphrase, --volume-id and the KMS options to
    a command. The wrapped function receives ``cred``."""

    @kms_options
    @click.option(
        "--key-file",
        type=click.Path(dir_okay=False),
        help="Unlock with this key file (mode 0600, at least 32 random bytes).",
    )
    @click.option(
        "--passphrase-file",
        type=click.Path(dir_okay=False),
        help="Unlock with the recovery passphrase stored in this file (mode 0600; "
        "one line, trailing newline ignored).",
    )
    @click.option(
        "--passphrase",
        "ask_passphrase",
        is_flag=True,
        help="Unlock with the recovery passphrase, asked on the terminal (or read "
        "as one line from standard input when it is not a terminal and carries no "
        "stream; with `-` as the source only the terminal is asked).",
    )
    @click.option(
        "--volume-id",
        "expected_volume",
        metavar="UUID",
        help="Refuse the volume unless its id is this one (as `sealfs info` shows "
        "it): a host cannot then swap in another volume that the same "
        "credential or app key opens.",
    )
    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        key_file: str | None,
        passphrase_file: str | None,
        ask_passphrase: bool,
        expected_volume: str | None,
        kms: KmsOptions,
        **kwargs: Any,
    ) -> Any:
        expected = parse_volume_id(expected_volume) if expected_volume else None
        if kms.url:
            if key_file or passphrase_file or ask_passphrase:
                raise UsageError("give either --kms or a key file/passphrase, not both")
            if kms.app_id is None:
                kms = replace(kms, app_id=_slot_app_id(kwargs.get("backing_dir")))
            kwargs["cred"] = KmsCredential(kms_client(kms), expected)
        else:
            stdin_busy = stdin_argument is not None and kwargs.get(stdin_argument) == "-"
            cred = resolve_credential(
                key_file, passphrase_file, ask_passphrase, stdin_busy=stdin_busy
            )
            kwargs["cred"] = replace(cred, expected_volume=expected)
        return fn(*args, **kwargs)

    return wrapper


def kms_client(kms: KmsOptions) -> KmsClient:
    """A KMS client for this CVM, with the chosen quote source and trusted KMS keys."""
    if not kms.urls or not kms.app_id:
        raise UsageError("--kms needs --app-id (or a volume whose kms slot names it)")
    # Lengths are the KMS client's to judge (a KmsError, like any other app id it refuses).
    app = _hex_option("--app-id", kms.app_id)
    compose = (
        _hex_option("--compose-hash", kms.compose_hash) if kms.compose_hash else DEV_COMPOSE_HASH
    )
    keys = [hex32_option("--kms-public-key", k, "an Ed25519 public key") for k in kms.public_keys]
    if kms.attester == "simulated":
        from sealfs.attest.simulated import DEFAULT_DEVICE_ID, SimulatedAttester

        device = (
            hex32_option("--device-id", kms.device_id, "a device id")
            if kms.device_id
            else DEFAULT_DEVICE_ID
        )
        quoter: Attester = SimulatedAttester(app, compose, device_id=device)
    else:
        if kms.compose_hash or kms.device_id:
            raise UsageError(
                "--compose-hash and --device-id only apply to --attester simulated; a "
                "real CVM's compose hash is measured at boot, its device id is its host's"
            )
        from sealfs.attest.configfs_tsm import ConfigfsTsmAttester

        quoter = ConfigfsTsmAttester(event_log_path=kms.event_log or DEFAULT_RUNTIME_LOG)
    return KmsClient(
        kms.urls,
        app,
        quoter,
        trusted_keys=keys,
        trust_on_first_use=kms.trust_on_first_use,
        deadline_s=kms.deadline,
        request_timeout_s=kms.request_timeout,
    )


def kms_client_args(client: Any) -> list[str]:
    """The KMS options that make the same client again (for the mount daemon): no secrets."""
    args = [f"--kms={url}" for url in client.urls]
    args += [
        "--app-id",
        client.app_id.hex(),
        "--attester",
        client.attester.kind,
        "--kms-deadline",
        str(client.deadline_s),
        "--kms-timeout",
        str(client.request_timeout_s),
    ]
    if client.attester.kind == "simulated":
        args += ["--compose-hash", client.attester.compose_hash.hex()]
        args += ["--device-id", client.attester.device_id.hex()]
    else:
        args += ["--event-log", str(client.attester.event_log_path)]
    for key in client.trusted_keys:
        args += ["--kms-public-key", key.hex()]
    if client.trust_on_first_use:
        args.append("--trust-on-first-use")
    return args


def hex32_option(option: str, text: str, what: str) -> bytes:
    """A 32-byte value given as 64 hex digits, or a one-line error naming the option."""
    try:
        return strict.hex_bytes(text, 32, 32)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not {what} (64 hex digits)") from None


def _hex_option(option: str, text: str) -> bytes:
    try:
        return strict.hex_bytes(text)
    except ValueError as e:
        raise UsageError(f"{option} {e}") from None


def _slot_app_id(backing: str | None) -> str | None:
    """The app id named by the volume's kms slot: only a default, since the KMS client refuses
    any app id other than the one this CVM measured."""
    if not backing:
        return None
    try:
        slot = load_header(Path(backing)).kms_slot()
    except SealfsError:
        return None
    return slot.kms["app_id"] if slot is not None and slot.kms else None


def resolve_credential(
    key_file: str | None,
    passphrase_file: str | None,
    ask_passphrase: bool,
    confirm: bool = False,
    stdin_busy: bool = False,
) -> KeyFileCredential | PassphraseCredential:
    given = [x for x in (key_file, passphrase_file, ask_passphrase) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of --key-file, --passphrase-file, --passphrase")
    if key_file:
        return read_key_file(key_file)
    if passphrase_file:
        return PassphraseCredential(read_passphrase_file(passphrase_file))
    if stdin_busy:
        return PassphraseCredential(_terminal_passphrase())
    return PassphraseCredential(prompt_passphrase(confirm))


def _terminal_passphrase() -> Secret:
    """The passphrase asked on the controlling terminal, for a command whose standard input
    carries data. Without a terminal this is refused: getpass would fall back to reading
    stdin, which would take the first line of the stream as the passphrase."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
    except OSError:
        raise UsageError(
            "--passphrase: standard input carries the stream and there is no terminal to "
            "ask on; use --passphrase-file"
        ) from None
    return _checked(getpass.getpass("Passphrase: ").encode())


def read_passphrase_file(path: str) -> Secret:
    """Read a passphrase file under the same rules as key files."""
    data = strict.read_secret_file(path, "passphrase file", MAX_PASSPHRASE_FILE_BYTES)
    return _checked(data.rstrip(b"\r\n"))


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
