"""Write the seed corpus of every fuzz target (tests/fuzz/corpus/TARGET/): valid inputs of
each format, so that the fuzzer starts from the interesting paths, plus crafted inputs that
once escaped as internal errors (regressions). Deterministic except for AEAD nonces.

Run from the repository root: ``python -m tests.fuzz.make_seeds [TESTDATA_DIR]`` (the
directory of Intel's TDX quote and collateral vectors, for the DCAP seeds; tests/data/tdx by
default).
"""

from __future__ import annotations

import base64
import json
import stat
import struct
import sys
from pathlib import Path

import lz4.block

from sealfs.crypto import KdfParams, Secret
from sealfs.kms import protocol
from sealfs.luks import profile as P
from sealfs.sealed import codec
from sealfs.sealed.inode import Inode
from sealfs.volume.header import Header, KeyFileCredential, PassphraseCredential, Slot
from tests.fuzz.targets import _DEFAULT_CP, KEY, KEYS, VOLUME_ID
from tests.tdx_vectors import TDX_VECTORS

CORPUS = Path(__file__).resolve().parent / "corpus"


def _volume_header() -> dict[str, bytes]:
    header = Header(volume_id=VOLUME_ID, block_size=131072, compression="lz4", created=1700000000)
    header.add_slot(KEY, KeyFileCredential(Secret(bytes(64))))
    header.add_slot(
        KEY,
        PassphraseCredential(Secret(b"passphrase")),
        KdfParams.default("scrypt", memory_kib=8, iterations=1, lanes=1),
    )
    header.slots.append(
        Slot(
            2,
            "kms",
            b"\x01" * 60,
            kms={
                "url": "https://127.0.0.1:8443",
                "app_id": "ab" * 8,
                "key_version": 1,
                "kms_public_key": "cd" * 32,
            },
        )
    )
    header.seal(KEY)
    good = header.to_bytes()
    doc = json.loads(good)
    out = {"valid": good}
    for name, edit in {
        "created-1e400": lambda d: d.update(created=1e400),
        "slot-id-minus-1": lambda d: d["slots"][0].update(id=-1),
        "kdf-memory-1e400": lambda d: d["slots"][1]["kdf"].update(memory_kib=1e400),
        "kms-key-version-huge": lambda d: d["slots"][2]["kms"].update(key_version=2**64),
    }.items():
        d = json.loads(good)
        edit(d)
        out[name] = json.dumps(d).encode()
    out["nested-2000"] = good[:-2] + b', "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    del doc
    return out


def _frames(gen: int, first: int, records: list[bytes]) -> bytes:
    return b"".join(
        codec.frame(KEYS.journal.seal(r, codec.journal_ad(VOLUME_ID, gen, s)))
        for s, r in enumerate(records, first)
    )


def _sections(parts: list[bytes], tail: bytes = b"") -> bytes:
    return bytes([len(parts)]) + b"".join(struct.pack(">H", len(p)) + p for p in parts) + tail


def _journal() -> dict[str, bytes]:
    record = Inode(2, stat.S_IFREG | 0o600, size=5)
    record.inline = b"hello"
    sealed = KEYS.inode(2).seal(record.to_record(), codec.inode_ad(VOLUME_ID, 2, 77))
    commits = [
        codec.Commit(1, 3, {2: 77}, [], {77: (2, sealed)}).encode(),
        codec.Commit(2, 3, {}, [2]).encode(),
        codec.Commit(3, 4, {3: 5}).encode(),
    ]
    frames = _frames(1, 1, commits)
    second = len(codec.frame(KEYS.journal.seal(commits[0], b"x")))
    damaged = bytearray(frames)
    damaged[second + 1] ^= 1
    huge = codec.Checkpoint(1, 2**64 - 1, 2, bytes(32), {1: 7}).encode()
    return {
        "raw-frames-torn": b"\x00" + frames + codec.frame(b"y" * 60)[:30],
        "raw-damaged-length": b"\x00" + bytes(damaged),
        "sealed-records": b"\x01" + _sections([_DEFAULT_CP.encode(), *commits], b"\x00" * 9),
        "checkpoint-seq-2^64-1": b"\x01" + _sections([huge, commits[0]]),
        "checkpoint-file": b"\x02" + codec.seal_checkpoint(KEYS.journal, VOLUME_ID, _DEFAULT_CP),
    }


def _record() -> dict[str, bytes]:
    f = Inode(7, stat.S_IFREG | 0o640, 1, 2, 3, 1 << 20, 1, 2, 3, 0, 0)
    f.blocks = {0: 11, 5: 12}
    f.xattrs = {b"user.a": b"\x00\xff"}
    d = Inode(1, stat.S_IFDIR | 0o755, parent=1)
    assert d.entries is not None
    d.entries.add(b"file", 7)
    d.entries.add(b"dir", 8)
    s = Inode(9, stat.S_IFLNK | 0o777)
    s.target = b"../t"
    i = Inode(10, stat.S_IFREG | 0o600, size=20)
    i.inline = b"inline data"
    return {
        "file": b"\x07" + f.to_record(),
        "dir": b"\x01" + d.to_record(),
        "symlink": b"\x09" + s.to_record(),
        "inline": b"\x0a" + i.to_record(),
    }


def _lz4() -> dict[str, bytes]:
    return {
        "text": lz4.block.compress(b"sealfs " * 500, store_size=True),
        "zeros": lz4.block.compress(bytes(4096), store_size=True),
        "declares-2GiB": struct.pack("<I", 0x7FFFFFFF) + b"\x10a",
    }


def _luks() -> dict[str, bytes]:
    area = P.LuksProfile().volume_key_bytes * P.AF_STRIPES
    area = -(-area // 4096) * 4096
    salt = base64.b64encode(bytes(32)).decode()
    meta = {
        "keyslots": {
            "0": {
                "type": "luks2",
                "key_size": 64,
                "af": {"type": "luks1", "stripes": P.AF_STRIPES, "hash": P.AF_HASH},
                "area": {
                    "type": "raw",
                    "offset": str(2 * P.HDR_SIZE),
                    "size": str(area),
                    "encryption": P.CIPHER,
                    "key_size": P.CIPHER_KEY_BYTES,
                },
                "kdf": {"type": "argon2id", "time": 4, "memory": 32, "cpus": 1, "salt": salt},
            }
        },
        "tokens": {},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": str(P.DATA_OFFSET),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": P.CIPHER,
                "sector_size": P.SECTOR_SIZE,
            }
        },
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": ["0"],
                "segments": ["0"],
                "hash": P.DIGEST_HASH,
                "iterations": 1000,
                "salt": salt,
                "digest": salt,
            }
        },
        "config": {"json_size": str(P.JSON_SIZE), "keyslots_size": str(P.KEYSLOTS_SIZE)},
    }
    text = json.dumps(meta, separators=(",", ":")).encode()
    return {
        "valid-json": b"\x00" + text,
        "nested-2000": b"\x00" + b"[" * 2000,
        "raw-zero": b"\x01" + bytes(64),
    }


def _kms() -> dict[str, bytes]:
    events = [
        {"event": "app-id", "payload": "ab" * 8},
        {"event": "compose-hash", "payload": "cd" * 32},
        {"event": "key-provider", "payload": protocol.key_provider_payload(bytes(32)).hex()},
        {"event": "boot-mr-done", "payload": ""},
    ]
    base = {
        "version": 1,
        "tee": "simulated",
        "nonce": "00" * 32,
        "public_key": "11" * 32,
        "quote": base64.b64encode(b"simulated quote").decode(),
        "event_log": events,
    }
    params = {
        0: {"purpose": "volume-wrap", "volume_id": "22" * 16, "key_version": None},
        1: {"volume_id": "22" * 16},
        2: {"volume_id": "22" * 16, "epoch": 5, "root_digest": "33" * 32},
    }
    out = {
        f"op{op}": bytes([op]) + json.dumps({**base, "params": p}).encode()
        for op, p in params.items()
    }
    out["nested-2000"] = b"\x00" + b"[" * 2000
    out["key-provider-nested"] = (
        b"\x00"
        + json.dumps(
            {
                **base,
                "params": params[0],
                "event_log": [
                    *events[:2],
                    {"event": "key-provider", "payload": (b"[" * 2000).hex()},
                ],
            }
        ).encode()
    )
    return out


def _dcap(testdata: Path | None) -> tuple[dict[str, bytes], dict[str, bytes]]:
    quotes: dict[str, bytes] = {}
    collateral: dict[str, bytes] = {"nested-2000": b"\x00" + b"[" * 2000}
    if testdata is None:
        return quotes, collateral
    quote = (testdata / "tdx_quote").read_bytes()
    quotes = {"v4-binary": quote, "v4-hex": quote.hex().encode()}
    raw = (testdata / "tdx_quote_collateral.json").read_bytes()
    doc = json.loads(raw)
    collateral.update(
        {
            "collateral": b"\x00" + raw,
            "tcb-info": b"\x01" + doc["tcb_info"].encode(),
            "qe-identity": b"\x02" + doc["qe_identity"].encode(),
        }
    )
    return quotes, collateral


def main() -> None:
    testdata = Path(sys.argv[1]) if len(sys.argv) > 1 else TDX_VECTORS
    quotes, collateral = _dcap(testdata)
    seeds = {
        "volume_header": _volume_header(),
        "journal": _journal(),
        "record": _record(),
        "lz4_block": _lz4(),
        "luks_header": _luks(),
        "kms_request": _kms(),
        "dcap_quote": quotes,
        "dcap_collateral": collateral,
    }
    for target, files in seeds.items():
        if not files:
            continue
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    main()
