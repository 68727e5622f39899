"""``sealfs kms``: create, run and administer a sealfs key management service."""

from __future__ import annotations

import getpass
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sealfs import strict
from sealfs.cli.exit_codes import fail_with
from sealfs.cli.logs import log_service
from sealfs.cli.output import emit, json_option
from sealfs.crypto import KdfParams, Secret
from sealfs.errors import IntegrityError, UsageError
from sealfs.kms.protocol import MAX_ID_BYTES

if TYPE_CHECKING:  # imported where used: `sealfs kms` commands load only what they run
    from sealfs.kms.derivation import StoreMac
    from sealfs.kms.store import KmsStore

MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096

state_option = click.option(
    "--state",
    "state",
    required=True,
    envvar="SEALFS_KMS_STATE",
    show_envvar=True,
    metavar="PATH|URL",
    help="KMS state: a SQLite file, or a postgresql:// URL (libpq syntax; keep the "
    "password in ~/.pgpass, not the URL) shared by several 'kms serve' replicas. It holds "
    "the sealed root key, the policies and the volume epochs.",
)
secret_option = click.option(
    "--secret-file",
    "secret_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the operator secret (must not be accessible by group or others). "
    "Without this option the secret is read from standard input. It is never taken "
    "from the command line or the environment.",
)


def read_operator_secret(path: Path | None, confirm: bool = False) -> Secret:
    """The operator secret from a private file, or stdin (prompted without echo on a TTY)."""
    if path is not None:
        raw = strict.read_secret_file(path, "secret file", MAX_SECRET_BYTES)
    elif sys.stdin.isatty():
        raw = getpass.getpass("KMS operator secret: ").encode()
        if confirm and getpass.getpass("Repeat operator secret: ").encode() != raw:
            raise UsageError("the two secrets differ")
    else:
        raw = sys.stdin.buffer.read(MAX_SECRET_BYTES + 1)
    if len(raw) > MAX_SECRET_BYTES:
        raise UsageError("operator secret too long")
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    if len(raw) < MIN_SECRET_BYTES:
        raise UsageError(f"operator secret must be at least {MIN_SECRET_BYTES} bytes")
    return Secret(raw)


def _open(state: str, secret_file: Path | None) -> tuple[KmsStore, StoreMac, Secret]:
    from sealfs.kms.derivation import StoreMac
    from sealfs.kms.store import KmsStore

    store = KmsStore(state)
    root = store.unlock(read_operator_secret(secret_file))
    return store, StoreMac(root), root


def _app_id(value: str) -> bytes:
    try:
        return strict.hex_bytes(value, 1, MAX_ID_BYTES)
    except ValueError as e:
        raise UsageError(f"APP_ID {e}") from None


@click.group("kms")
def kms() -> None:
    """Key management service: releases app keys to attested CVMs and anchors volume epochs.

    The KMS keeps one state file: a random root key sealed under an operator secret
    (argon2id + AES-256-GCM), the release policy of each app, and the latest epoch of every
    volume. App keys are derived from the root key (HKDF, labelled by purpose, app id, key
    version and volume id), so replicas sharing the state file's root give the same keys.
    Protocol and checks: docs/kms-protocol.md.
    """


@kms.command("init")
@state_option
@secret_option
@click.option(
    "--kdf-memory-kib",
    type=click.IntRange(8192, 4 * 1024 * 1024),
    default=65536,
    show_default=True,
    help="argon2id memory cost for sealing the root key.",
)
@json_option
def init(state: str, secret_file: Path | None, kdf_memory_kib: int, as_json: bool) -> None:
    """Create a new KMS state file with a fresh random root key.

    Refuses to overwrite an existing file: replacing the root key would make every key it
    ever released underivable. Prints the KMS identity public key, which CVMs pin.
    """
    from sealfs.kms.derivation import identity_key
    from sealfs.kms.store import KmsStore

    secret = read_operator_secret(secret_file, confirm=True)
    store, root = KmsStore.initialize(state, secret, KdfParams.default(memory_kib=kdf_memory_kib))
    pub = identity_key(root).public_bytes.hex()
    emit(
        {"ok": True, "state": store.location, "kms_public_key": pub},
        as_json,
        f"created KMS state {store.location}\nKMS public key: {pub}",
    )


high_water_option = click.option(
    "--high-water",
    "high_water",
    type=click.Path(dir_okay=False, path_type=Path),
    help="This replica's record of the highest state version it served (created if "
    "missing, MACed under the root key). Keep it on the replica's own disk, never with the "
    "database or its backups: a state older than it is refused (docs/operations.md). "
    "'kms serve' requires it with a postgresql:// state.",
)


@kms.command("info")
@click.option(
    "--state",
    "state",
    envvar="SEALFS_KMS_STATE",
    show_envvar=True,
    metavar="PATH|URL",
    help="KMS state to show (a SQLite file or a postgresql:// URL); needs the operator secret.",
)
@secret_option
@high_water_option
@click.option(
    "--kms",
    "urls",
    metavar="URL",
    multiple=True,
    help="Instead of the state, ask the running replica at URL (http://host:port) "
    "whether it answers, with which public key and protocol version, and how fast; "
    "repeat it for each replica. Needs no secret.",
)
@click.option(
    "--kms-public-key",
    "pinned",
    metavar="HEX",
    multiple=True,
    help="With --kms: the public key(s) CVMs pin; a replica answering with another is "
    "reported as a failure.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 300),
    default=5.0,
    show_default=True,
    help="With --kms: seconds to wait for each replica.",
)
@json_option
def info(
    state: str | None,
    secret_file: Path | None,
    high_water: Path | None,
    urls: tuple[str, ...],
    pinned: tuple[str, ...],
    timeout: float,
    as_json: bool,
) -> None:
    """Show a KMS: this replica's view of its state (--state), or its running replicas
    (--kms URL ...).

    With --state: where the state is (the database reached), its format, the KMS identity
    public key, the table version, the apps that have a policy and how many volumes have an
    epoch, and (with --high-water) the highest version this replica recorded as served,
    after checking the whole state (row MACs, table digests); an unreachable database is an
    error. Record the table version somewhere the KMS host cannot write: 'kms serve
    --min-state-version' refuses a state that went back behind it.

    With --kms (repeatable): one line per replica - reachable or why not, the public key it
    announces, its protocol version and the round-trip latency of GET /v1/info. Exits 8 (kms)
    if a replica is unreachable, or the replicas announce different keys, or a key not given
    with --kms-public-key. What /v1/info says is unauthenticated: it helps an operator find a
    broken replica, it is never a reason to trust one.

    \b
    Examples:
      sealfs kms info --state /var/lib/sealfs/kms.db --secret-file /root/kms.secret
      sealfs kms info --kms http://kms1:8750 --kms http://kms2:8750 --json
    """
    if urls:
        source = click.get_current_context().get_parameter_source("state")
        if source is click.core.ParameterSource.COMMANDLINE:
            raise UsageError("give --state or --kms, not both")
        _replicas_info(urls, pinned, timeout, as_json)
        return
    if pinned:
        raise UsageError("--kms-public-key goes with --kms")
    if state is None:
        raise UsageError("give --state PATH (a state file) or --kms URL (running replicas)")
    from sealfs.kms.derivation import identity_key
    from sealfs.kms.highwater import HighWater
    from sealfs.kms.store import FORMAT_VERSION

    store, macs, root = _open(state, secret_file)
    found = store.verify(macs)
    apps = [p.app_id.hex() for p in store.list_policies(macs)]
    pub = identity_key(root).public_bytes.hex()
    served = HighWater(high_water, macs).load() if high_water is not None else None
    text = (
        f"KMS public key: {pub}\nstate: {store.location} (reachable, format {FORMAT_VERSION})\n"
        f"state table version: {found.version}"
        + ("" if served is None else f" (this replica served up to {served})")
        + (
            ""
            if served is None or served <= found.version
            else "\nROLLED BACK: the state is older than what this replica served; "
            "'kms serve' refuses it (docs/operations.md)"
        )
        + f"\nvolumes with an epoch: {found.epochs}\napps with a policy: {len(apps)}"
        + "".join(f"\n  {a}" for a in apps)
    )
    emit(
        {
            "ok": True,
            "kms_public_key": pub,
            "state": store.location,
            "reachable": True,
            "format": FORMAT_VERSION,
            "state_version": found.version,
            "served_version": served,
            "rolled_back": served is not None and served > found.version,
            "volumes": found.epochs,
            "apps": apps,
        },
        as_json,
        text,
    )


def _replicas_info(
    urls: tuple[str, ...], pinned: tuple[str, ...], timeout: float, as_json: bool
) -> None:
    """Probe each replica once, in order; report them all, then fail if one is amiss."""
    from dataclasses import asdict

    from sealfs.cli.credentials import hex32_option
    from sealfs.errors import KmsError
    from sealfs.kms.client import probe

    keys = {hex32_option("--kms-public-key", k, "an Ed25519 public key").hex() for k in pinned}
    try:
        found = [probe(url, timeout) for url in urls]
    except KmsError as e:  # a malformed URL
        raise UsageError(e.message) from None
    announced = {r.kms_public_key for r in found if r.reachable}
    problems = [f"{r.url} unreachable" for r in found if not r.reachable]
    if len(announced) > 1:
        problems.append("the replicas announce different public keys")
    if keys:
        problems += [
            f"{r.url} announces a key that is not pinned"
            for r in found
            if r.reachable and r.kms_public_key not in keys
        ]
    lines = []
    for r in found:
        if r.reachable:
            lines.append(
                f"{r.url}  reachable  {r.latency_ms:.1f} ms  protocol {r.protocol}  "
                f"key {r.kms_public_key}"
            )
        else:
            lines.append(f"{r.url}  UNREACHABLE  {r.error}")
    emit(
        {"ok": not problems, "replicas": [asdict(r) for r in found], "problems": problems},
        as_json,
        "\n".join(lines + [f"problem: {p}" for p in problems]),
    )
    if problems:
        fail_with(KmsError)


@kms.command("serve")
@state_option
@secret_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback exposes the KMS to the network.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8750,
    show_default=True,
    help="TCP port; 0 picks a free one (printed on startup).",
)
@click.option(
    "--allow-simulated",
    is_flag=True,
    help="DANGEROUS: accept simulated (software-signed) quotes for apps whose policy "
    "opts in (policy set --simulated). Only for development and CI; anyone can "
    "forge them.",
)
@click.option(
    "--collateral",
    "collateral_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="DCAP collateral (JSON) used for TDX quotes whose request carries none.",
)
@click.option(
    "--nonce-ttl",
    type=click.IntRange(5, 600),
    default=60,
    show_default=True,
    help="Seconds a key-release nonce stays valid.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(0.5, 300),
    default=5.0,
    show_default=True,
    help="Seconds a client has to send its request headers; idle and slow-loris "
    "connections get 408 and are closed (never more than --request-timeout).",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(0.5, 300),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send one whole request (slow senders get 408); "
    "also the longest a connection waits in the queue for a free slot.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, 4096),
    default=128,
    show_default=True,
    help="Connections served at once; more wait in a fair queue (the next free slot "
    "goes to the waiting peer holding the fewest).",
)
@click.option(
    "--max-connections-per-peer",
    type=click.IntRange(1, 4096),
    default=16,
    show_default=True,
    help="Open connections (served or queued) per peer address (IPv4 address or "
    "IPv6 /64); one more gets 429 and is closed. CVMs behind one NAT share it.",
)
@click.option(
    "--max-queued",
    type=click.IntRange(0, 65536),
    default=512,
    show_default=True,
    help="Connections that may wait for a slot; beyond that new ones get 503.",
)
@click.option(
    "--min-state-version",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Refuse to start if the state file's table version (logged at every "
    "start) is lower: pass the last version you recorded to catch a state "
    "file restored from an older copy.",
)
@high_water_option
@click.option(
    "--peer",
    "peers",
    metavar="URL",
    multiple=True,
    help="Another replica of the same state (http://host:port); repeatable. At start and "
    "every --peer-check-interval seconds this replica asks each peer the highest state "
    "version it served (signed with the shared identity key) and refuses a database older "
    "than that. An unreachable peer is logged and skipped.",
)
@click.option(
    "--peer-check-interval",
    type=click.FloatRange(1, 3600),
    default=30.0,
    show_default=True,
    help="Seconds between two cross-checks with the --peer replicas.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Log verbosity (logs go to stderr).",
)
def serve(
    state: str,
    secret_file: Path | None,
    host: str,
    port: int,
    allow_simulated: bool,
    collateral_file: Path | None,
    nonce_ttl: int,
    header_timeout: float,
    request_timeout: float,
    max_connections: int,
    max_connections_per_peer: int,
    max_queued: int,
    min_state_version: int,
    high_water: Path | None,
    peers: tuple[str, ...],
    peer_check_interval: float,
    log_level: str,
) -> None:
    """Run the KMS HTTP service until interrupted.

    Unlocks the root key with the operator secret, then serves GET /v1/info, POST /v1/nonce,
    POST /v1/key, POST /v1/epoch/get and POST /v1/epoch/advance. Prints one line
    "listening on http://HOST:PORT (KMS public key HEX)" to stdout when ready. Every request
    and every refusal is logged to stderr (a peer's repeated 429s once); keys never are.

    Connection limits (docs/kms-protocol.md §9): one request per connection; a peer keeps at
    most --max-connections-per-peer open; --max-connections are served at once and up to
    --max-queued more wait for a slot, handed out fairly between peers; headers must arrive
    within --header-timeout and the whole request within --request-timeout.
    """
    import trio

    from sealfs.kms.derivation import StoreMac, identity_key
    from sealfs.kms.highwater import HighWater
    from sealfs.kms.peers import cross_check, cross_check_every
    from sealfs.kms.server import HttpLimits, KmsHttpServer
    from sealfs.kms.service import KmsService, ServiceConfig
    from sealfs.kms.store import KmsStore

    log_service(sys.stderr, log_level.upper())
    log = logging.getLogger("sealfs.kms")
    collateral = None
    if collateral_file is not None:
        try:
            collateral = strict.loads(collateral_file.read_bytes())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read collateral {collateral_file}: {e}") from None
        if not isinstance(collateral, dict):
            raise UsageError("collateral file must hold a JSON object")
    if high_water is None and state.startswith(("postgresql:", "postgres:")):
        raise UsageError(
            "a postgresql:// state needs --high-water FILE on this replica's own disk: "
            "without it a database restored from an older copy goes unnoticed"
        )
    store = KmsStore(state)
    root = store.unlock(read_operator_secret(secret_file))
    if high_water is not None:
        store.remember_in(HighWater(high_water, StoreMac(root)))
    public_key = identity_key(root).public_bytes
    cross_check(store, public_key, peers)  # before the state is verified and served
    service = KmsService(
        store,
        root,
        ServiceConfig(
            allow_simulated=allow_simulated,
            nonce_ttl_s=float(nonce_ttl),
            default_collateral=collateral,
        ),
    )
    if service.state_version < min_state_version:
        raise IntegrityError(
            f"KMS state table version {service.state_version} is below "
            f"--min-state-version {min_state_version}: the state file was "
            "rolled back"
        )
    if allow_simulated:
        banner = (
            "*** --allow-simulated: this KMS releases keys to SIMULATED TEEs whose quotes "
            "anyone can forge. NEVER use it for real data. ***"
        )
        click.echo(banner, err=True)
        log.warning(banner)
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s: the KMS is reachable from the network", host)
    server = KmsHttpServer(
        service,
        HttpLimits(
            header_timeout_s=min(header_timeout, request_timeout),
            read_timeout_s=request_timeout,
            max_connections=max_connections,
            max_connections_per_peer=max_connections_per_peer,
            max_queued=max_queued,
        ),
    )

    async def main() -> None:
        try:
            listeners = await server.listen(host, port)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        bound = listeners[0].socket.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        click.echo(
            f"listening on http://{shown}:{bound} (KMS public key {service.public_key.hex()})"
        )
        sys.stdout.flush()
        async with trio.open_nursery() as nursery:
            if peers:
                nursery.start_soon(cross_check_every, peer_check_interval, store, public_key, peers)
            await server.serve_listeners(listeners)

    trio.run(main)


@kms.group("policy")
def policy() -> None:
    """Manage per-app release policies (stored MACed in the state file).

    A policy lists the allowed (MRTD, RTMR0, RTMR1, RTMR2) image measurements, allowed compose
    hashes and TCB statuses, whether debug TDs are allowed, optionally the hosts (device ids)
    allowed to receive the keys, and the app's current key version.
    The KMS reads policies per request, so changes apply to a running server at once.
    """


@policy.command("set")
@click.argument("app_id")
@state_option
@secret_option
@click.option(
    "--file",
    "policy_file",
    type=click.File("rb"),
    help="A policy as JSON ('-' for stdin): app_id, measurements "
    "[{mrtd, rtmr0, rtmr1, rtmr2}], compose_hashes, tcb_statuses, allow_debug, "
    "allow_simulated, require_sept_ve_disable, allow_reserved_td_attributes, "
    "allow_service_td, devices (docs/attestation.md). Flags below add to it.",
)
@click.option("--mrtd", help="MRTD (48-byte hex) of one allowed image; needs --rtmr0..2.")
@click.option("--rtmr0", help="RTMR0 (48-byte hex) of that image.")
@click.option("--rtmr1", help="RTMR1 (48-byte hex) of that image.")
@click.option("--rtmr2", help="RTMR2 (48-byte hex) of that image.")
@click.option(
    "--simulated",
    is_flag=True,
    help="Development only: accept simulated TEEs for this app (the KMS must also "
    "run with --allow-simulated) and allow their default measurements.",
)
@click.option(
    "--compose-hash",
    "compose_hashes",
    multiple=True,
    help="Allowed compose hash (32-byte hex); repeatable.",
)
@click.option(
    "--tcb-status",
    "tcb_statuses",
    multiple=True,
    help="Allowed TCB status; repeatable (default: UpToDate).",
)
@click.option(
    "--device",
    "devices",
    metavar="ID",
    multiple=True,
    help="Allow only hosts with this device id (32-byte hex: SHA-256 of the PPID of a "
    "TDX host, as `sealfs attest verify` shows it); repeatable. Without any "
    "--device (or a devices list in --file) every host is allowed.",
)
@click.option(
    "--any-device",
    is_flag=True,
    help="Allow every host: no device list (clears one from --file). This is the "
    "default when no --device is given.",
)
@click.option("--allow-debug", is_flag=True, help="Allow debug TDs (the host can read them).")
@click.option(
    "--allow-sept-ve",
    is_flag=True,
    help="Allow TDs without SEPT_VE_DISABLE (TD attribute bit 28), in which the host "
    "can make EPT violations raise #VE inside the guest. Default: refused.",
)
@click.option(
    "--allow-reserved-td-attributes",
    is_flag=True,
    help="Allow TD attribute bits this verifier does not know. Default: refused.",
)
@click.option(
    "--allow-service-td",
    is_flag=True,
    help="Allow a non-zero MRSERVICETD (a service TD bound to this TD, e.g. a "
    "migration TD). Default: refused.",
)
@json_option
def policy_set(
    app_id: str,
    state: str,
    secret_file: Path | None,
    policy_file: Any,
    mrtd: str | None,
    rtmr0: str | None,
    rtmr1: str | None,
    rtmr2: str | None,
    simulated: bool,
    compose_hashes: tuple[str, ...],
    tcb_statuses: tuple[str, ...],
    devices: tuple[str, ...],
    any_device: bool,
    allow_debug: bool,
    allow_sept_ve: bool,
    allow_reserved_td_attributes: bool,
    allow_service_td: bool,
    as_json: bool,
) -> None:
    """Create or replace the policy of APP_ID (hex). The key versions (current and retired)
    are kept."""
    from sealfs.attest import simulated as sim
    from sealfs.kms.policy import AppPolicy

    app = _app_id(app_id)
    doc: dict[str, Any] = {"app_id": app.hex(), "measurements": [], "compose_hashes": []}
    if policy_file is not None:
        if getattr(policy_file, "name", "") == "<stdin>" and secret_file is None:
            raise UsageError("with --file - the operator secret must come from --secret-file")
        try:
            loaded = strict.loads(policy_file.read(1 << 20))
        except ValueError:
            raise UsageError("policy file is not valid JSON") from None
        if not isinstance(loaded, dict):
            raise UsageError("policy file must hold a JSON object")
        if "key_version" in loaded:
            raise UsageError("key_version cannot be set; use 'sealfs kms policy rotate'")
        if "retired_versions" in loaded:
            raise UsageError(
                "retired_versions cannot be set; use 'sealfs kms policy retire-version'"
            )
        if loaded.setdefault("app_id", app.hex()) != app.hex():
            raise UsageError("the policy file's app_id differs from APP_ID")
        doc.update(loaded)
    regs = (mrtd, rtmr0, rtmr1, rtmr2)
    if any(regs):
        if not all(regs):
            raise UsageError("--mrtd, --rtmr0, --rtmr1 and --rtmr2 go together")
        doc["measurements"] = [
            *doc["measurements"],
            dict(zip(("mrtd", "rtmr0", "rtmr1", "rtmr2"), regs, strict=True)),
        ]
    if simulated:
        doc["allow_simulated"] = True
        doc["measurements"] = [
            *doc["measurements"],
            {
                "mrtd": sim.DEFAULT_MRTD.hex(),
                "rtmr0": sim.DEFAULT_RTMR0.hex(),
                "rtmr1": sim.DEFAULT_RTMR1.hex(),
                "rtmr2": sim.DEFAULT_RTMR2.hex(),
            },
        ]
    doc["compose_hashes"] = [*doc["compose_hashes"], *compose_hashes]
    if tcb_statuses:
        doc["tcb_statuses"] = list(tcb_statuses)
    if devices and any_device:
        raise UsageError("give --device or --any-device, not both")
    doc["devices"] = [] if any_device else [*doc.get("devices", []), *devices]
    if allow_debug:
        doc["allow_debug"] = True
    if allow_sept_ve:
        doc["require_sept_ve_disable"] = False
    if allow_reserved_td_attributes:
        doc["allow_reserved_td_attributes"] = True
    if allow_service_td:
        doc["allow_service_td"] = True
    new = AppPolicy.from_dict(doc)
    if not new.measurements or not new.compose_hashes:
        raise UsageError("a policy needs at least one measurement and one compose hash")
    store, macs, _ = _open(state, secret_file)
    old = store.get_policy(macs, app)
    if old is not None:
        new = new.with_versions_of(old)
    store.put_policy(macs, new)
    emit(
        {"ok": True, "policy": new.to_dict()},
        as_json,
        f"policy for app {app.hex()} saved (key version {new.key_version})",
    )


@policy.command("show")
@click.argument("app_id", required=False)
@state_option
@secret_option
@json_option
def policy_show(app_id: str | None, state: str, secret_file: Path | None, as_json: bool) -> None:
    """Show the policy of APP_ID, or of every app (MACs are verified), with the key
    versions the KMS still releases (live_key_versions: 1 to key_version, less the retired)."""
    store, macs, _ = _open(state, secret_file)
    if app_id is not None:
        found = store.get_policy(macs, _app_id(app_id))
        if found is None:
            raise UsageError(f"no policy for app id {app_id}")
        policies = [found]
    else:
        policies = store.list_policies(macs)
    docs = [{**p.to_dict(), "live_key_versions": p.live_versions()} for p in policies]
    emit(
        {"ok": True, "policies": docs},
        as_json,
        "\n".join(json.dumps(d, indent=2) for d in docs) or "no policies",
    )


@policy.command("remove")
@click.argument("app_id")
@state_option
@secret_option
@json_option
def policy_remove(app_id: str, state: str, secret_file: Path | None, as_json: bool) -> None:
    """Delete APP_ID's policy: the KMS stops releasing its keys (its epochs are kept)."""
    store, macs, _ = _open(state, secret_file)
    if not store.delete_policy(macs, _app_id(app_id)):
        raise UsageError(f"no policy for app id {app_id}")
    emit({"ok": True, "removed": app_id}, as_json, f"policy for app {app_id} removed")


@policy.command("rotate")
@click.argument("app_id")
@state_option
@secret_option
@json_option
def policy_rotate(app_id: str, state: str, secret_file: Path | None, as_json: bool) -> None:
    """Make a new key version current for APP_ID.

    New key requests get the new version; older versions stay derivable (ask for them
    explicitly) so volumes can be re-wrapped from the old key to the new one.
    """
    store, macs, _ = _open(state, secret_file)
    new = store.rotate_policy(macs, _app_id(app_id))
    emit(
        {"ok": True, "app_id": app_id, "key_version": new.key_version},
        as_json,
        f"app {app_id} now at key version {new.key_version}",
    )


@policy.command("retire-version")
@click.argument("app_id")
@click.argument("version", metavar="N", type=click.IntRange(1))
@state_option
@secret_option
@json_option
def policy_retire_version(
    app_id: str, version: int, state: str, secret_file: Path | None, as_json: bool
) -> None:
    """Stop releasing key version N of APP_ID, for good.

    Do this once every volume has been re-wrapped to a newer version ('sealfs key rotate'):
    a get_key for N is then refused (key_version_retired, exit 8 on the client) and a volume
    still on N opens only with its recovery slot (key file or passphrase). The current
    version cannot be retired: run 'sealfs kms policy rotate' first. Retiring does not
    revoke: N stays derivable from the root key, and whoever already holds it keeps it.
    """
    store, macs, _ = _open(state, secret_file)
    new = store.retire_version(macs, _app_id(app_id), version)
    live = new.live_versions()
    emit(
        {"ok": True, "app_id": app_id, "retired": version, "live_key_versions": live},
        as_json,
        f"app {app_id}: key version {version} retired; live versions: " + ", ".join(map(str, live)),
    )
