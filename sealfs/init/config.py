"""The declarative volume list, ``/etc/sealfs/volumes.toml`` (schema: docs/init.md).

The file is part of the measured CVM image, never of the data disk: it is the trust root for
which KMS and which volumes. So it is read strictly: unknown keys, wrong types and impossible
values are errors that name the file, the line and the field (``tomllib`` gives no positions
for values; :class:`_Lines` finds the line of a key by a small scan of the text, which is
enough to point the operator at it).
"""

from __future__ import annotations

import re
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealfs import strict
from sealfs.errors import UsageError

DEFAULT_CONFIG = "/etc/sealfs/volumes.toml"
DEFAULT_EVENT_LOG = "/run/log/sealfs/runtime_events.log"
DEFAULT_RUNTIME_DIR = "/run/sealfs/init"
MAX_CONFIG_BYTES = 1 << 20
MAX_URLS = 8
MAX_DEADLINE = 3600.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_OWNER = re.compile(r"([0-9]{1,10}):([0-9]{1,10})")
_MODE = re.compile(r"0?[0-7]{3,4}")
_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+")

KMS_KEYS = {
    "urls",
    "public_keys",
    "app_id",
    "app_id_file",
    "attester",
    "deadline",
    "event_log",
    "compose_hash",
    "device_id",
}
INIT_KEYS = {"runtime_dir"}
COMMON_VOLUME_KEYS = {"name", "kind", "mountpoint", "create", "owner", "mode"}
KIND_KEYS = {
    "sealfs": {"backing", "compression", "volume_id"},
    "luks": {"device", "filesystem", "integrity"},
}


class ConfigError(UsageError):
    """The volume list is malformed: the message names file:line and the field."""


@dataclass(frozen=True)
class KmsConfig:
    urls: tuple[str, ...]
    public_keys: tuple[bytes, ...]
    app_id: bytes
    attester: str
    deadline: float
    event_log: Path
    compose_hash: bytes | None
    device_id: bytes | None


@dataclass(frozen=True)
class VolumeConfig:
    """One ``[[volume]]``; ``source`` is the backing directory (sealfs) or device (luks)."""

    index: int
    name: str
    kind: str
    source: Path
    mountpoint: Path
    create: bool
    owner: tuple[int, int] | None
    mode: int | None
    compression: str = "none"
    volume_id: bytes | None = None
    filesystem: str = "ext4"
    integrity: bool = False

    @property
    def label(self) -> str:
        return f"volume {self.name}"


@dataclass(frozen=True)
class InitConfig:
    path: Path
    kms: KmsConfig
    runtime_dir: Path
    volumes: tuple[VolumeConfig, ...]


class _Lines:
    """Finds the line of a table or of a key inside it, for error messages."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def _table_start(self, table: str, index: int | None) -> int | None:
        header = re.compile(
            rf"^\s*\[\[\s*{table}\s*\]\]" if index is not None else rf"^\s*\[\s*{table}\s*\]"
        )
        seen = -1
        for n, line in enumerate(self.lines):
            if header.match(line):
                seen += 1
                if index is None or seen == index:
                    return n
        return None

    def line(self, table: str, index: int | None, key: str | None) -> int:
        start = self._table_start(table, index)
        if start is None:
            return 1
        if key is not None:
            pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
            for n in range(start + 1, len(self.lines)):
                if re.match(r"^\s*\[", self.lines[n]):
                    break
                if pattern.match(self.lines[n]):
                    return n + 1
        return start + 1

    def error(self, table: str, index: int | None, key: str | None, problem: str) -> ConfigError:
        where = table if index is None else f"{table}[{index}]"
        field = f"{where}.{key}" if key else where
        return ConfigError(f"{self.path}:{self.line(table, index, key)}: {field}: {problem}")


class _Table:
    """One table of the file, with typed getters that fail with a positioned error."""

    def __init__(self, lines: _Lines, name: str, index: int | None, data: dict[str, Any]) -> None:
        self.lines, self.name, self.index, self.data = lines, name, index, data

    def fail(self, key: str | None, problem: str) -> ConfigError:
        return self.lines.error(self.name, self.index, key, problem)

    def only(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.fail(key, f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def text(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default)
        if value is None:
            raise self.fail(None, f"missing field {key!r}")
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.text(key, default)
        if value not in choices:
            raise self.fail(key, f"{value!r} is not one of {', '.join(map(repr, choices))}")
        return value

    def path(self, key: str, default: str | None = None) -> Path:
        value = self.text(key, default)
        if not value.startswith("/") or "\0" in value:
            raise self.fail(key, f"{value!r} is not an absolute path")
        return Path(value)

    def hex(self, key: str, low: int, high: int) -> bytes:
        value = self.text(key)
        try:
            return strict.hex_bytes(value, low, high)
        except ValueError as e:
            raise self.fail(key, str(e)) from None

    def items(self, key: str) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            raise self.fail(None, f"missing field {key!r}")
        if not isinstance(value, list) or not value:
            raise self.fail(key, "must be a non-empty list")
        return value


def load_config(path: str | Path) -> InitConfig:
    """Read and validate the volume list at ``path``; ConfigError (exit 2) on any mistake."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the volume list: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        doc = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        # Python < 3.14 has no e.lineno: the position is in the message's tail.
        m = re.search(r"^(.*) \(at line (\d+), column \d+\)$", str(e))
        line, why = (m[2], m[1]) if m else (getattr(e, "lineno", 1), str(e))
        raise ConfigError(f"{path}:{line}: not valid TOML: {why}") from None
    lines = _Lines(path, text)
    for key in doc:
        if key not in ("kms", "init", "volume"):
            raise ConfigError(f"{path}:1: {key}: unknown table (allowed: kms, init, volume)")
    if not isinstance(doc.get("kms"), dict):
        raise ConfigError(f"{path}:1: kms: missing the [kms] table")
    kms = _kms(_Table(lines, "kms", None, doc["kms"]))
    init = doc.get("init", {})
    if not isinstance(init, dict):
        raise ConfigError(f"{path}:1: init: must be a table")
    init_table = _Table(lines, "init", None, init)
    init_table.only(INIT_KEYS)
    runtime_dir = init_table.path("runtime_dir", DEFAULT_RUNTIME_DIR)
    volumes = doc.get("volume")
    if not isinstance(volumes, list) or not volumes:
        raise ConfigError(f"{path}:1: volume: declare at least one [[volume]] table")
    parsed = tuple(
        _volume(_Table(lines, "volume", i, v if isinstance(v, dict) else {}))
        for i, v in enumerate(volumes)
    )
    _unique(lines, parsed)
    return InitConfig(path, kms, runtime_dir, parsed)


def _kms(t: _Table) -> KmsConfig:
    t.only(KMS_KEYS)
    urls = t.items("urls")
    if len(urls) > MAX_URLS:
        raise t.fail("urls", f"at most {MAX_URLS} URLs")
    for url in urls:
        if not isinstance(url, str) or not _URL.fullmatch(url):
            raise t.fail("urls", f"{url!r} is not an http(s)://host[:port] URL")
    keys = []
    for key in t.items("public_keys"):
        try:
            keys.append(strict.hex_bytes(key, 32, 32))
        except ValueError:
            raise t.fail(
                "public_keys", f"{key!r} is not an Ed25519 public key (64 hex digits)"
            ) from None
    if ("app_id" in t.data) == ("app_id_file" in t.data):
        raise t.fail(None, "give exactly one of 'app_id' and 'app_id_file'")
    app_id = t.hex("app_id", 1, 64) if "app_id" in t.data else _app_id_file(t)
    attester = t.choice("attester", ("tdx", "simulated"), "tdx")
    deadline = t.data.get("deadline", 60)
    if (
        isinstance(deadline, bool)
        or not isinstance(deadline, int | float)
        or not 0 < deadline <= MAX_DEADLINE
    ):
        raise t.fail("deadline", f"must be a number of seconds in (0, {MAX_DEADLINE:g}]")
    simulated = {k: t.hex(k, 32, 32) for k in ("compose_hash", "device_id") if k in t.data}
    if simulated and attester != "simulated":
        raise t.fail(next(iter(simulated)), 'only applies to attester = "simulated"')
    return KmsConfig(
        tuple(urls),
        tuple(keys),
        app_id,
        attester,
        float(deadline),
        t.path("event_log", DEFAULT_EVENT_LOG),
        simulated.get("compose_hash"),
        simulated.get("device_id"),
    )


def _app_id_file(t: _Table) -> bytes:
    path = t.path("app_id_file")
    try:
        with open(path, "rb") as f:
            text = f.read(257).decode("ascii").strip()
        return strict.hex_bytes(text, 1, 64)
    except OSError as e:
        raise t.fail("app_id_file", f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, ValueError):
        raise t.fail("app_id_file", f"{path} does not hold an app id (1-64 bytes as hex)") from None


def _volume(t: _Table) -> VolumeConfig:
    if not t.data:
        raise t.fail(None, "must be a non-empty table")
    kind = t.choice("kind", ("sealfs", "luks"))
    t.only(COMMON_VOLUME_KEYS | KIND_KEYS[kind])
    name = t.text("name")
    if not _NAME.fullmatch(name):
        raise t.fail("name", f"{name!r}: use 1-64 characters of A-Z a-z 0-9 _ . - (not first)")
    create = t.choice("create", ("first-boot", "never"), "never") == "first-boot"
    owner = None
    if "owner" in t.data:
        m = _OWNER.fullmatch(t.text("owner"))
        if not m or max(int(m[1]), int(m[2])) >= 2**32 - 1:
            raise t.fail("owner", f'{t.data["owner"]!r} is not numeric "uid:gid"')
        owner = (int(m[1]), int(m[2]))
    mode = None
    if "mode" in t.data:
        text = t.text("mode")
        if not _MODE.fullmatch(text):
            raise t.fail("mode", f'{text!r} is not an octal mode (e.g. "0750")')
        mode = int(text, 8)
    common: dict[str, Any] = dict(
        index=t.index,
        name=name,
        kind=kind,
        mountpoint=t.path("mountpoint"),
        create=create,
        owner=owner,
        mode=mode,
    )
    if kind == "sealfs":
        volume_id = None
        if "volume_id" in t.data:
            try:
                volume_id = uuid.UUID(t.text("volume_id")).bytes
            except ValueError:
                raise t.fail("volume_id", f"{t.data['volume_id']!r} is not a UUID") from None
        return VolumeConfig(
            source=t.path("backing"),
            compression=t.choice("compression", ("none", "lz4"), "none"),
            volume_id=volume_id,
            **common,
        )
    integrity = t.data.get("integrity", False)
    if not isinstance(integrity, bool):
        raise t.fail("integrity", "must be true or false")
    return VolumeConfig(
        source=t.path("device"),
        filesystem=t.choice("filesystem", ("ext4", "none"), "ext4"),
        integrity=integrity,
        **common,
    )


def _unique(lines: _Lines, volumes: tuple[VolumeConfig, ...]) -> None:
    for field in ("name", "mountpoint", "source"):
        seen: dict[object, int] = {}
        for v in volumes:
            value = getattr(v, field)
            if value in seen:
                key = {"source": "backing" if v.kind == "sealfs" else "device"}.get(field, field)
                raise lines.error(
                    "volume",
                    v.index,
                    key,
                    f"{str(value)!r} is already used by volume[{seen[value]}]",
                )
            seen[value] = v.index
