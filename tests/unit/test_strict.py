"""The strict input readers: hex fields and secret files, as every caller now meets them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sealfs import strict
from sealfs.errors import UsageError
from sealfs.kms import protocol as P


@pytest.mark.parametrize(
    "text,expected",
    [("", b""), ("dead", b"\xde\xad"), ("DEad", b"\xde\xad"), ("00ff", b"\x00\xff")],
)
def test_hex_takes_exactly_pairs_of_hex_digits(text: str, expected: bytes) -> None:
    assert strict.hex_bytes(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        "de ad",
        " dead",
        "dead\n",
        "dea",
        "0xde",
        "+dead",
        "de_ad",
        "\u0660\u0660",
        "ｄｅ",
        b"de",
        None,
        12,
    ],
)
def test_hex_refuses_everything_else(value: object) -> None:
    """``bytes.fromhex`` takes the first two (whitespace between and around pairs)."""
    with pytest.raises(ValueError, match="hex digit pairs"):
        strict.hex_bytes(value)


def test_hex_length_bounds() -> None:
    assert strict.hex_bytes("ab" * 32, 32, 32) == b"\xab" * 32
    for text, lo, hi, words in (
        ("ab" * 31, 32, 32, "must be 32 bytes"),
        ("ab" * 65, 1, 64, "must be 1-64 bytes"),
        ("ab", 2, None, "must be at least 2 bytes"),
    ):
        with pytest.raises(ValueError, match=words):
            strict.hex_bytes(text, lo, hi)


def test_kms_protocol_refuses_spaced_hex() -> None:
    """docs/kms-protocol.md promises exact hex; the request parser used to take "de ad"."""
    with pytest.raises(P.ProtocolError, match="volume_id must be a string of hex digit pairs"):
        P.hex_field({"volume_id": "de ad"}, "volume_id", 1, 64)
    assert P.hex_field({"volume_id": "dead"}, "volume_id", 1, 64) == b"\xde\xad"


def _secret(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_secret_file_is_read_when_private(tmp_path: Path) -> None:
    assert strict.read_secret_file(_secret(tmp_path / "k", b"x" * 10), "key file", 10) == b"x" * 10


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660])
def test_secret_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _secret(tmp_path / "k", b"secret", mode)
    with pytest.raises(UsageError, match=f"accessible by group or others .*chmod 600 {path}"):
        strict.read_secret_file(path, "key file", 100)


def test_secret_file_rules(tmp_path: Path) -> None:
    cases = {
        "does not exist": tmp_path / "missing",
        "is empty": _secret(tmp_path / "empty", b""),
        "is larger than 4 bytes": _secret(tmp_path / "big", b"12345"),
        "is not a regular file": tmp_path,
    }
    for words, path in cases.items():
        with pytest.raises(UsageError, match=f"passphrase file {path} {words}"):
            strict.read_secret_file(path, "passphrase file", 4)


def test_secret_file_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UsageError, match="not a regular file"):
        strict.read_secret_file(fifo, "key file", 100)


def test_secret_file_check_is_on_what_was_opened(tmp_path: Path) -> None:
    """The checks are made on the descriptor: a symlink to a loose file is judged by the file
    it reaches, not by the link's own mode."""
    target = _secret(tmp_path / "loose", b"secret", 0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UsageError, match="accessible by group or others"):
        strict.read_secret_file(link, "key file", 100)
    target.chmod(0o600)
    assert strict.read_secret_file(link, "key file", 100) == b"secret"
