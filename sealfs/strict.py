"""Strict readers for every input sealfs takes from an untrusted or foreign source: JSON
(volume and LUKS2 headers, DCAP collateral, KMS requests and answers), hex fields (the same
documents and command-line options such as ``--app-id``) and secret files (key files,
passphrase files, the KMS operator secret).

JSON: a key given twice in one object is an ambiguity an attacker can exploit (two parsers may
keep different values), NaN/Infinity are not JSON at all, and a document nested thousands of
levels deep makes Python's decoder raise RecursionError (or run out of stack) instead of
refusing it; all three raise ValueError, which callers turn into their own error type. No
format sealfs reads nests deeper than a handful of levels, so :data:`MAX_DEPTH` is generous.

Hex: exactly pairs of hex digits (either case), nothing else: ``bytes.fromhex`` alone would
take ``"de ad"``, so two readers of one document could disagree about what it says.

Secret files: checked on the opened descriptor (fstat), so the file read is the file checked.
"""

from __future__ import annotations

import json
import os
import re
import stat
from itertools import accumulate
from typing import Any, NoReturn

from sealfs.errors import UsageError

#: Deepest nesting of arrays and objects accepted (sealfs's own formats use fewer than 10).
MAX_DEPTH = 64

# A JSON string, unrolled so that matching is linear: escapes cannot hide a quote.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
# O_NONBLOCK: opening a FIFO must not wait for a writer (fstat then refuses it).
_SECRET_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


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


def hex_bytes(value: Any, min_len: int = 0, max_len: int | None = None) -> bytes:
    """The bytes spelled by ``value``: a string of hex digit pairs (upper or lower case, no
    whitespace, sign or prefix) of ``min_len`` to ``max_len`` bytes; ValueError otherwise.
    The length is checked before decoding, so an oversized field costs nothing. The
    ValueError's message reads after the field's name (``f"{name} {e}"``)."""
    if not isinstance(value, str):
        raise ValueError("must be a string of hex digit pairs")
    if len(value) < 2 * min_len or max_len is not None and len(value) > 2 * max_len:
        size = (
            f"at least {min_len}"
            if max_len is None
            else f"{min_len}"
            if min_len == max_len
            else f"{min_len}-{max_len}"
        )
        raise ValueError(f"must be {size} bytes")
    if not _HEX.fullmatch(value):
        raise ValueError("must be a string of hex digit pairs")
    return bytes.fromhex(value)


def read_secret_file(path: str | os.PathLike[str], what: str, max_bytes: int) -> bytes:
    """The contents of a file holding a secret (``what`` names it in messages), refused unless
    it is a non-empty regular file of at most ``max_bytes``, owned by this user or root, that
    neither group nor others may access: anyone else able to read it holds the secret, anyone
    able to write it chooses it. The checks are made on the opened descriptor (no race with a
    rename) and the read is bounded even if the file grows meanwhile."""
    try:
        fd = os.open(path, _SECRET_OPEN)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(
                f"{what} {path} is accessible by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        if st.st_uid not in (0, os.geteuid()):
            raise UsageError(f"{what} {path} is owned by another user")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, max_bytes + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise UsageError(f"{what} {path} is larger than {max_bytes} bytes")
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if not size:
        raise UsageError(f"{what} {path} is empty")
    return b"".join(chunks)
