"""Strict JSON decoding for everything sealfs reads from an untrusted or foreign source (LUKS2
headers, DCAP collateral, KMS requests).

A key given twice in one object is an ambiguity an attacker can exploit (two parsers may
keep different values), and NaN/Infinity are not JSON at all; both raise ValueError, which
callers turn into their own error type.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn


def reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` object hook: refuse a key given twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def reject_constant(name: str) -> NoReturn:
    """``json.loads`` constant hook: refuse NaN, Infinity and -Infinity."""
    raise ValueError(f"non-standard JSON constant {name}")


def loads(data: str | bytes) -> Any:
    """``json.loads`` with duplicate keys and non-standard constants refused."""
    return json.loads(data, object_pairs_hook=reject_duplicates, parse_constant=reject_constant)
