"""Per-app release policy: which measured CVMs may receive an app's keys.

A policy is keyed by app id and lists what must hold for a verified quote:

* ``measurements``: allowed (MRTD, RTMR0, RTMR1, RTMR2) tuples - the firmware, kernel,
  initrd and command line of an approved image. Whole tuples, not one list per register, so
  the kernel of one image cannot be combined with the command line of another.
* ``compose_hashes``: allowed app configurations (SHA-256 of the app compose file), as
  measured into RTMR3 and read from the replayed event log.
* ``tcb_statuses``: acceptable platform TCB statuses (default: only ``UpToDate``).
  ``Revoked`` can never be allowed.
* ``allow_debug``: whether a debug TD (whose memory the host can read) is acceptable;
  default no.
* ``require_sept_ve_disable`` (default yes): TD attribute SEPT_VE_DISABLE (bit 28) must be
  set. Without it the TD takes a #VE for every access to a page the host has not accepted or
  has removed, and a guest kernel that does not handle that exactly lets the host steer it.
* ``allow_reserved_td_attributes`` (default no): whether TD attribute bits this verifier does
  not know (anything but DEBUG, SEPT_VE_DISABLE, PKS, KL, PERFMON) may be set; a TD
  configuration nobody has reviewed is refused rather than trusted.
* ``allow_service_td`` (default no): whether MRSERVICETD (TD 1.5 quotes) may be non-zero, i.e.
  a service TD (such as a migration TD) bound to this TD, which can act on its behalf.
  Intel's QVL checks none of these three; they are deployment policy.
* ``devices``: the hosts allowed to receive the app's keys, by device id (on TDX SHA-256 of
  the PPID in the quote's PCK certificate, as dstack derives it; see docs/attestation.md).
  Empty (the default, and what policies written before this field mean) allows any host.
  Pinning hosts makes moving a volume an explicit act: allow the new host, move, remove the
  old one.
* ``allow_simulated``: whether this app accepts simulated TEEs at all (development apps
  only). Both this and the KMS-wide ``--allow-simulated`` are needed, so a production KMS
  started with the flag by mistake still refuses forged quotes for every production app.
* ``key_version``: the app's current key version; older versions stay derivable.
* ``retired_versions``: older key versions the KMS no longer releases (``sealfs kms policy
  retire-version``), once every volume has been re-wrapped to a newer one. Empty (the
  default, and what policies written before this field mean) keeps every version live. The
  current version can never be retired: a get_key without a version must always succeed.

Policies are stored as canonical JSON with a MAC under the root key (see ``store.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sealfs import strict
from sealfs.attest.eventlog import AppIdentity
from sealfs.attest.quote import TD_ATTR_DEBUG, TD_ATTR_DEFINED, TD_ATTR_SEPT_VE_DISABLE
from sealfs.crypto import ct_equal
from sealfs.errors import UsageError
from sealfs.kms.protocol import MAX_ID_BYTES, MAX_KEY_VERSION

MR_SIZE = 48
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)
MAX_ENTRIES = 256
DEVICE_ID_SIZE = 32
#: Yes/no fields of a policy document; each default is the dataclass default (the safe choice).
_FLAGS = (
    "allow_debug",
    "allow_simulated",
    "require_sept_ve_disable",
    "allow_reserved_td_attributes",
    "allow_service_td",
)


class PolicyDenied(Exception):
    """A verified CVM does not meet its app's policy. The message names the failed check
    (safe to return) but never the allowed values."""


class Report(Protocol):
    """The verified quote fields policy needs (see ``sealfs.kms.verify.QuoteReport``), read
    only: policy never changes what a quote proved."""

    @property
    def mrtd(self) -> bytes: ...
    @property
    def rtmr0(self) -> bytes: ...
    @property
    def rtmr1(self) -> bytes: ...
    @property
    def rtmr2(self) -> bytes: ...
    @property
    def tee(self) -> str: ...
    @property
    def tcb_status(self) -> str: ...
    @property
    def td_attributes(self) -> bytes: ...
    @property
    def mr_servicetd(self) -> bytes | None: ...  # None: a TD 1.0 quote (no service TD)
    @property
    def device_id(self) -> bytes: ...


@dataclass(frozen=True)
class Measurement:
    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes

    def matches(self, report: Report) -> bool:
        # Evaluate every comparison (no short-circuit) so timing says nothing about which one.
        results = [
            ct_equal(self.mrtd, report.mrtd),
            ct_equal(self.rtmr0, report.rtmr0),
            ct_equal(self.rtmr1, report.rtmr1),
            ct_equal(self.rtmr2, report.rtmr2),
        ]
        return all(results)

    def to_dict(self) -> dict[str, str]:
        return {
            "mrtd": self.mrtd.hex(),
            "rtmr0": self.rtmr0.hex(),
            "rtmr1": self.rtmr1.hex(),
            "rtmr2": self.rtmr2.hex(),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Measurement:
        if not isinstance(d, dict) or set(d) != {"mrtd", "rtmr0", "rtmr1", "rtmr2"}:
            raise UsageError("a measurement needs exactly mrtd, rtmr0, rtmr1, rtmr2")
        return cls(*(_hex(d[k], k, MR_SIZE, MR_SIZE) for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2")))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hex(value: Any, name: str, lo: int, hi: int) -> bytes:
    try:
        return strict.hex_bytes(value, lo, hi)
    except ValueError as e:
        raise UsageError(f"{name} {e}") from None


@dataclass(frozen=True)
class AppPolicy:
    app_id: bytes
    measurements: tuple[Measurement, ...] = ()
    compose_hashes: tuple[bytes, ...] = ()
    tcb_statuses: tuple[str, ...] = ("UpToDate",)
    devices: tuple[bytes, ...] = ()  # empty: any host
    allow_debug: bool = False
    allow_simulated: bool = False
    require_sept_ve_disable: bool = True
    allow_reserved_td_attributes: bool = False
    allow_service_td: bool = False
    key_version: int = 1
    retired_versions: tuple[int, ...] = ()  # sorted, each below key_version

    def __post_init__(self) -> None:
        if not 1 <= len(self.app_id) <= MAX_ID_BYTES:
            raise UsageError("app id must be 1-64 bytes")
        if not 1 <= self.key_version <= MAX_KEY_VERSION:
            raise UsageError("key version out of range")
        for status in self.tcb_statuses:
            if status not in TCB_STATUSES:
                raise UsageError(
                    f"unknown or never-allowed TCB status {status!r} "
                    f"(known: {', '.join(TCB_STATUSES)})"
                )
        for h in self.compose_hashes:
            if len(h) != 32:
                raise UsageError("compose hashes are 32 bytes (SHA-256)")
        for d in self.devices:
            if len(d) != DEVICE_ID_SIZE:
                raise UsageError("device ids are 32 bytes (SHA-256 of the PPID)")
        if list(self.retired_versions) != sorted(set(self.retired_versions)):
            raise UsageError("retired_versions must be sorted and distinct")
        if any(not 1 <= v < self.key_version for v in self.retired_versions):
            raise UsageError("retired_versions must be older than the current key version")
        if max(len(self.measurements), len(self.compose_hashes), len(self.devices)) > MAX_ENTRIES:
            raise UsageError(f"at most {MAX_ENTRIES} measurements, compose hashes and devices")

    def to_dict(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id.hex(),
            "measurements": [m.to_dict() for m in self.measurements],
            "compose_hashes": [h.hex() for h in self.compose_hashes],
            "tcb_statuses": list(self.tcb_statuses),
            "devices": [d.hex() for d in self.devices],
            **{flag: getattr(self, flag) for flag in _FLAGS},
            "key_version": self.key_version,
            "retired_versions": list(self.retired_versions),
        }

    def canonical(self) -> bytes:
        """The exact bytes stored and MACed."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: Any) -> AppPolicy:
        """Parse a policy document strictly (unknown fields are errors, not ignored)."""
        if not isinstance(d, dict):
            raise UsageError("a policy must be a JSON object")
        allowed = {
            "app_id",
            "measurements",
            "compose_hashes",
            "tcb_statuses",
            "devices",
            "key_version",
            "retired_versions",
            *_FLAGS,
        }
        unknown = set(d) - allowed
        if unknown:
            raise UsageError(f"unknown policy field {sorted(unknown)[0]!r}")
        if "app_id" not in d:
            raise UsageError("policy needs an app_id")
        lists = {k: d.get(k, []) for k in ("measurements", "compose_hashes", "devices")}
        statuses = d.get("tcb_statuses", ["UpToDate"])
        if not all(isinstance(v, list) for v in (*lists.values(), statuses)):
            raise UsageError("measurements, compose_hashes, devices and tcb_statuses must be lists")
        flags = {flag: d.get(flag, getattr(cls, flag)) for flag in _FLAGS}
        for flag, value in flags.items():
            if not isinstance(value, bool):
                raise UsageError(f"{flag} must be true or false")
        version = d.get("key_version", 1)
        if not _is_int(version):
            raise UsageError("key_version must be an integer")
        retired = d.get("retired_versions", [])
        if not isinstance(retired, list) or not all(_is_int(v) for v in retired):
            raise UsageError("retired_versions must be a list of integers")
        if not all(isinstance(s, str) for s in statuses):
            raise UsageError("tcb_statuses must be strings")
        return cls(
            app_id=_hex(d["app_id"], "app_id", 1, MAX_ID_BYTES),
            measurements=tuple(Measurement.from_dict(m) for m in lists["measurements"]),
            compose_hashes=tuple(_hex(h, "compose hash", 32, 32) for h in lists["compose_hashes"]),
            tcb_statuses=tuple(statuses),
            devices=tuple(
                _hex(x, "device id", DEVICE_ID_SIZE, DEVICE_ID_SIZE) for x in lists["devices"]
            ),
            key_version=version,
            retired_versions=tuple(sorted(retired)),
            **flags,
        )

    def with_version(self, key_version: int) -> AppPolicy:
        return replace(self, key_version=key_version)

    def with_versions_of(self, old: AppPolicy) -> AppPolicy:
        """This policy with ``old``'s key versions (current and retired): replacing a policy
        must neither roll the key back nor bring a retired version back to life."""
        return replace(self, key_version=old.key_version, retired_versions=old.retired_versions)

    def retire(self, version: int) -> AppPolicy:
        """This policy with key ``version`` retired; refuses what would break live volumes
        or cannot be meant (the current version, one never issued, one already retired)."""
        if version == self.key_version:
            raise UsageError(
                f"key version {version} is the current one and cannot be retired; "
                "run 'sealfs kms policy rotate' first"
            )
        if not 1 <= version < self.key_version:
            raise UsageError(
                f"key version {version} does not exist for this app (versions 1-{self.key_version})"
            )
        if version in self.retired_versions:
            raise UsageError(f"key version {version} is already retired")
        return replace(self, retired_versions=tuple(sorted((*self.retired_versions, version))))

    def live_versions(self) -> list[int]:
        """The key versions the KMS still releases, oldest first."""
        retired = set(self.retired_versions)
        return [v for v in range(1, self.key_version + 1) if v not in retired]

    def check(self, report: Report, identity: AppIdentity) -> None:
        """Raise PolicyDenied unless the verified ``report`` and replayed ``identity`` fit."""
        if not ct_equal(identity.app_id, self.app_id):  # the store lookup already matched
            raise PolicyDenied("app id does not match the policy")
        if report.tee != "tdx" and not self.allow_simulated:
            raise PolicyDenied("simulated TEEs are not allowed for this app")
        if not any([m.matches(report) for m in self.measurements]):
            raise PolicyDenied("MRTD/RTMR0-2 are not an allowed image for this app")
        if not any([ct_equal(h, identity.compose_hash) for h in self.compose_hashes]):
            raise PolicyDenied("compose hash is not allowed for this app")
        if report.tcb_status not in self.tcb_statuses:
            raise PolicyDenied(f"TCB status {report.tcb_status} is not allowed for this app")
        self._check_td(report)
        if self.devices and not any([ct_equal(d, report.device_id) for d in self.devices]):
            raise PolicyDenied(
                f"host device {report.device_id.hex()} is not among this app's allowed devices"
            )

    def _check_td(self, report: Report) -> None:
        """TD attributes and MRSERVICETD: what a TDX deployment needs beyond Intel's QVL."""
        attributes = int.from_bytes(report.td_attributes, "little")
        if attributes & TD_ATTR_DEBUG and not self.allow_debug:
            raise PolicyDenied("debug TDs are not allowed for this app")
        if self.require_sept_ve_disable and not attributes & TD_ATTR_SEPT_VE_DISABLE:
            raise PolicyDenied("TD attribute SEPT_VE_DISABLE is not set (required for this app)")
        if attributes & ~TD_ATTR_DEFINED and not self.allow_reserved_td_attributes:
            raise PolicyDenied(f"reserved TD attribute bits are set ({report.td_attributes.hex()})")
        service_td = report.mr_servicetd is not None and any(report.mr_servicetd)
        if service_td and not self.allow_service_td:
            raise PolicyDenied("MRSERVICETD is not zero: a service TD is bound to this TD")
