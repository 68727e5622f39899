"""The header MAC covers bytes docs/format.md defines exactly ("Canonical body").

``spec_canonical`` below is written from the document's text alone (no ``json`` module), as an
independent reader would write it; it must give the very bytes sealfs authenticates, on
headers with every slot type, non-ASCII text and the largest integers the format allows.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sealfs.crypto import KdfParams, Secret
from sealfs.errors import FormatError, IntegrityError
from sealfs.kms.protocol import MAX_KEY_VERSION
from sealfs.volume.header import (
    MAX_HEADER_INT,
    MAX_SLOT_ID,
    Header,
    KeyFileCredential,
    Slot,
    new_header,
)

_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _string(text: str) -> str:
    out = []
    for ch in text:
        cp = ord(ch)
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif 0x20 <= cp <= 0x7E:
            out.append(ch)
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}")
        else:
            out.append(f"\\u{cp:04x}")
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if v is True or v is False or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    keys = sorted(v, key=lambda k: [ord(c) for c in k])
    return "{" + ",".join(_string(k) + ":" + _value(v[k]) for k in keys) + "}"


def spec_canonical(stored: bytes) -> bytes:
    """The canonical body of a stored header, by the text of docs/format.md."""
    doc = json.loads(stored)
    del doc["mac"]
    return _value(doc).encode("ascii")


def _headers() -> list[Header]:
    cred = KeyFileCredential(Secret.generate(64))
    plain, master = new_header(4096, "none")
    plain.add_slot(master, cred)
    wide, master = new_header(4 * 1024 * 1024, "lz4")
    wide.created = MAX_HEADER_INT
    wide.slots = [
        Slot(MAX_SLOT_ID, "keyfile", b"\x01" * 48, salt=b"\x02" * 16),
        Slot(
            7,
            "passphrase",
            b"\x03" * 48,
            kdf=KdfParams("argon2id", b"\x04" * 16, 4 * 1024 * 1024, 64, 16),
        ),
        Slot(
            3,
            "kms",
            b"\x05" * 48,
            kms={
                "url": 'https://bücher.example:8443"\\\t\n\x7f\u2028é😀',
                "app_id": "ab" * 64,
                "key_version": MAX_KEY_VERSION,
                "kms_public_key": "",
            },
        ),
    ]
    wide.seal(master)
    upgraded, master = new_header(131072, "none")
    upgraded.format_version = 1
    upgraded.add_slot(master, cred)
    upgraded.upgrade_format_1(upgraded.volume_keys(master))
    return [plain, wide, upgraded]


@pytest.mark.parametrize("header", _headers(), ids=["plain", "unicode-and-limits", "upgraded"])
def test_an_independent_reader_computes_the_same_canonical_body(header: Header) -> None:
    stored = header.to_bytes()
    assert spec_canonical(stored) == header.canonical_body()
    reread = Header.from_bytes(stored)
    assert reread.canonical_body() == header.canonical_body() and reread.mac == header.mac


def test_unlock_verifies_the_stored_document() -> None:
    cred = KeyFileCredential(Secret.generate(64))
    header, master = new_header(4096, "none")
    header.add_slot(master, cred)
    assert Header.from_bytes(header.to_bytes()).unlock(cred) == master
    doc = json.loads(header.to_bytes())
    doc["block_size"] = 8192
    with pytest.raises(IntegrityError, match="authentication"):
        Header.from_bytes(json.dumps(doc).encode()).unlock(cred)


def _edits() -> dict[str, Any]:
    def slot(doc: dict[str, Any]) -> dict[str, Any]:
        return doc["slots"][0]  # type: ignore[no-any-return]

    return {
        "unknown member": lambda d: d.update(note="x"),
        "unknown slot member": lambda d: slot(d).update(note="x"),
        "empty salt": lambda d: d["slots"].append({**slot(d), "id": 9, "salt": ""}),
        "upper-case volume id": lambda d: d.update(volume_id=d["volume_id"].upper()),
        "upper-case mac": lambda d: d.update(mac=d["mac"].upper()),
        "spaced hex": lambda d: slot(d).update(
            wrapped=slot(d)["wrapped"][:2] + " " + slot(d)["wrapped"][2:]
        ),
        "float member": lambda d: d.update(extra=1.5),
        "boolean version": lambda d: d.update(format_version=True),
    }


@pytest.mark.parametrize("name", list(_edits()))
def test_a_header_that_is_not_its_canonical_form_is_refused(name: str) -> None:
    """Before this rule an unknown member or a spelling change passed the MAC unnoticed (the MAC
    was over the fields re-serialised, not over what was stored)."""
    cred = KeyFileCredential(Secret.generate(64))
    header, master = new_header(4096, "none")
    header.add_slot(master, cred)
    doc = json.loads(header.to_bytes())
    _edits()[name](doc)
    with pytest.raises(FormatError):
        Header.from_bytes(json.dumps(doc).encode())


def test_kms_slot_members_are_exact() -> None:
    header, master = new_header(4096, "none")
    header.slots = [
        Slot(
            0,
            "kms",
            b"\x05" * 48,
            kms={"url": "http://kms:1", "app_id": "ab", "key_version": 1, "kms_public_key": ""},
        )
    ]
    header.seal(master)
    Header.from_bytes(header.to_bytes())
    for edit in ({"extra": 1}, {"app_id": "a b"}, {"kms_public_key": "zz"}):
        doc = json.loads(header.to_bytes())
        doc["slots"][0]["kms"].update(edit)
        with pytest.raises(FormatError):
            Header.from_bytes(json.dumps(doc).encode())


def test_a_body_too_large_for_its_label_is_refused_not_a_crash() -> None:
    """The MAC takes the canonical body as one label part (u16 length): a host that lengthens
    a kms slot's URL (outside the slot's associated data) must meet a format error."""
    header, _ = new_header(4096, "none")
    header.slots = [
        Slot(
            0,
            "kms",
            b"\x05" * 48,
            kms={
                "url": "http://" + "k" * 70000,
                "app_id": "ab",
                "key_version": 1,
                "kms_public_key": "",
            },
        )
    ]
    doc = {**header.body(), "mac": "00" * 32}
    with pytest.raises(FormatError, match="too large"):
        Header.from_bytes(json.dumps(doc).encode())
