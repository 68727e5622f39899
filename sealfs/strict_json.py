"""Strict JSON decoding for everything sealfs reads from an untrusted or foreign source (volume
and LUKS2 headers, DCAP collateral, KMS requests and answers).

A key given twice in one object is an ambiguity an attacker can exploit (two parsers may
keep different values), NaN/Infinity are not JSON at all, and a document nested thousands of
levels deep makes Python's decoder raise RecursionError (or run out of stack) instead of
refusing it; all three raise ValueError, which callers turn into their own error type. No
format sealfs reads nests deeper than a handful of levels, so :data:`MAX_DEPTH` is generous.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any, NoReturn

#: Deepest nesting of arrays and objects accepted (sealfs's own formats use fewer than 10).
MAX_DEPTH = 64

# A JSON string, unrolled so that matching is linear: escapes cannot hide a quote.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


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


def nesting_depth(data: bytes) -> int:
    """The deepest bracket nesting of ``data`` outside strings, in linear time (an upper bound
    for malformed text, which the decoder refuses anyway)."""
    brackets = b"".join(_BRACKETS.findall(_STRING.sub(b"", data)))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads(data: str | bytes) -> Any:
    """``json.loads`` with duplicate keys, non-standard constants and nesting deeper than
    :data:`MAX_DEPTH` refused; every refusal is a ValueError (UnicodeDecodeError included)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if nesting_depth(raw) > MAX_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    return json.loads(data, object_pairs_hook=reject_duplicates, parse_constant=reject_constant)


def integer_in(value: Any, lo: int, hi: int) -> bool:
    """True if ``value`` is a JSON integer in [lo, hi]: not a bool, not a float (``1e400`` is
    infinity, which ``int()`` cannot convert), not a string of digits."""
    return type(value) is int and lo <= value <= hi
