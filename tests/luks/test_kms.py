"""LUKS passphrases from a real KMS (``sealfs kms serve`` on 127.0.0.1, simulated TEE).

Volumes are formatted with the KMS key and checked with real ``cryptsetup open
--test-passphrase`` (no device-mapper needed): the key of the right app and volume opens key
slot 0; another app's key, another volume's key, or another key version does not.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sealfs.errors import LuksError, UsageError
from sealfs.kms.client import KmsClient
from sealfs.kms.derivation import app_key
from sealfs.kms.protocol import PURPOSE_LUKS_PASSPHRASE
from sealfs.luks import cryptsetup as cs
from sealfs.luks import keys as K
from sealfs.luks import profile as P
from sealfs.luks.volume import check_volume_key, format_volume
from tests.kms.conftest import (
    APP_A,
    APP_B,
    COMPOSE_A,
    COMPOSE_B,
    KmsProcess,
    KmsState,
    attester,
    make_state,
    sim_policy,
    start_kms,
)

from . import attacker as A
from .conftest import new_image, sealfs_cli, write_key
from .test_cli import assert_secrets_only_on_stdin, run_tool

VOLUME = "db"
SUBSYSTEM_OFFSET = 208


@pytest.fixture(scope="module")
def kms_state(tmp_path_factory: pytest.TempPathFactory) -> KmsState:
    return make_state(tmp_path_factory.mktemp("luks-kms"))


@pytest.fixture(scope="module")
def kms(kms_state: KmsState) -> Iterator[KmsProcess]:
    server = start_kms(kms_state, "--allow-simulated")
    yield server
    server.stop()


def source(kms: KmsProcess, app: bytes = APP_A, compose: bytes | None = None) -> K.KmsKeySource:
    return K.KmsKeySource(
        KmsClient(
            kms.url, app, attester(app, compose), deadline_s=10, trusted_keys=[kms.public_key]
        )
    )


def fetch(kms: KmsProcess, app: bytes = APP_A, volume: str = VOLUME, version: int = 1) -> bytes:
    """The passphrase the KMS releases to ``app`` for ``volume`` (fetched as a CVM would)."""
    src = source(kms, app)
    return src.existing_key(src.binding(volume), version).reveal()


def kms_args(
    kms: KmsProcess, app: bytes = APP_A, compose: bytes | None = None, volume: str | None = VOLUME
) -> list[str]:
    compose = compose if compose is not None else (COMPOSE_A if app == APP_A else COMPOSE_B)
    args = [
        "--kms",
        kms.url,
        "--app-id",
        app.hex(),
        "--attester",
        "simulated",
        "--compose-hash",
        compose.hex(),
        "--kms-deadline",
        "5",
        "--kms-public-key",
        kms.public_key.hex(),
    ]
    return args + (["--volume-id", volume] if volume else [])


def one_error_line(stderr: str) -> str:
    """Failures print exactly one error line (a KMS warning may precede it)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln]
    errors = [ln for ln in lines if ln.startswith("sealfs: error:")]
    assert len(errors) == 1, stderr
    assert all(ln.startswith(("sealfs: error:", "sealfs: warning:")) for ln in lines), stderr
    return errors[0]


def test_format_with_kms_key_opens_only_for_its_app_and_volume(
    tmp_path: Path, kms: KmsProcess
) -> None:
    img = new_image(tmp_path / "vol.img")
    res = sealfs_cli("luks", "format", str(img), *kms_args(kms), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["app_id"], out["volume_id"], out["kms_key_version"]) == (APP_A.hex(), VOLUME, 1)

    # The key version is recorded in the subsystem field of both header copies.
    region = A.read_region(img)
    for copy in (0, P.HDR_SIZE):
        field = bytes(region[copy + SUBSYSTEM_OFFSET : copy + SUBSYSTEM_OFFSET + 48])
        assert field.rstrip(b"\0") == b"sealfs-kms-v1"
    status = json.loads(sealfs_cli("luks", "status", str(img), "--json").stdout)
    assert status["valid"] and status["header"]["kms_key_version"] == 1

    key = fetch(kms)
    assert len(key) == 64 and bytes.fromhex(key.decode())  # hex of a 32-byte KMS key
    assert A.cryptsetup_unlocks(img, key)
    assert not A.cryptsetup_unlocks(img, fetch(kms, app=APP_B))
    assert not A.cryptsetup_unlocks(img, fetch(kms, volume="db2"))
    assert not A.cryptsetup_unlocks(img, key[:-1])

    res = sealfs_cli("luks", "check-key", str(img), *kms_args(kms), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["kms_key_version"] == 1
    res = sealfs_cli("luks", "check-key", str(img), *kms_args(kms, app=APP_B))
    assert res.returncode == 3 and "no key slot opened" in one_error_line(res.stderr)
    res = sealfs_cli("luks", "check-key", str(img), *kms_args(kms, volume="db2"))
    assert res.returncode == 3, res.stderr
    # A CVM that runs another compose than app A's policy allows gets no key at all.
    res = sealfs_cli("luks", "check-key", str(img), *kms_args(kms, compose=COMPOSE_B))
    assert res.returncode == 9 and "KMS refused" in one_error_line(res.stderr)
    # A key file holding the KMS passphrase (fetched elsewhere) opens it too.
    keyfile = write_key(tmp_path / "k", key)
    assert sealfs_cli("luks", "check-key", str(img), "--key-file", str(keyfile)).returncode == 0


def test_passphrase_is_the_kms_key_for_app_purpose_and_volume(
    kms_state: KmsState, kms: KmsProcess
) -> None:
    """The passphrase is the hex of HKDF(root, purpose luks-passphrase, app id, version,
    volume id): the KMS's own derivation, bound to exactly this app and volume."""
    assert K.PURPOSE_LUKS == PURPOSE_LUKS_PASSPHRASE
    expected = app_key(kms_state.root, PURPOSE_LUKS_PASSPHRASE, APP_A, 1, VOLUME.encode())
    assert fetch(kms) == expected.reveal().hex().encode()
    src = source(kms)
    new = src.new_key(src.binding(VOLUME))
    assert new.key_version == 1 and new.passphrase.reveal() == fetch(kms)
    assert new.passphrase.reveal().decode() not in repr(new) + repr(src)


def test_kms_passphrase_never_in_argv_environment_or_files(
    tmp_path: Path,
    kms: KmsProcess,
    cryptsetup_calls: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole CLI path (KMS exchange, format with a recovery slot, key check), run in this
    process so that every cryptsetup call is seen: the KMS passphrase goes in on stdin only,
    the recovery passphrase through a pipe; neither is in argv, the environment, or any file
    the command left behind."""
    from sealfs.cli import main

    monkeypatch.setattr(logging.getLogger("sealfs"), "handlers", [])  # the CLI adds one
    img = new_image(tmp_path / "vol.img")
    rec_bytes = b"recovery passphrase of the kms spy test"
    rec = write_key(tmp_path / "rec", rec_bytes)
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "luks",
            "format",
            str(img),
            *kms_args(kms, volume="spy"),
            "--recovery-key-file",
            str(rec),
            "--recovery-iter-time",
            "100",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        main, ["luks", "check-key", str(img), *kms_args(kms, volume="spy"), "--recovery-slot"]
    )
    assert res.exit_code == 0, res.output
    key = fetch(kms, volume="spy")
    raw = bytes.fromhex(key.decode())
    assert [c["argv"][1] for c in cryptsetup_calls] == ["luksFormat", "luksAddKey", "open"]
    assert_secrets_only_on_stdin(cryptsetup_calls, [key, raw, rec_bytes])
    assert all(c["input"] == key for c in cryptsetup_calls)
    assert key.decode() not in res.output and key.decode() not in str(os.environ)
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != rec:
            data = path.read_bytes()
            assert key not in data and raw not in data, path


def test_kms_source_rules(kms: KmsProcess) -> None:
    src = source(kms)
    with pytest.raises(LuksError, match="records no KMS key version"):
        src.existing_key(src.binding(VOLUME), None)
    with pytest.raises(UsageError, match="at most 64"):
        src.new_key(src.binding("v" * 65))
    with pytest.raises(UsageError, match="is for app"):
        src.new_key(K.KeyBinding(APP_B.hex(), VOLUME))


def test_cli_key_options_are_one_line_errors(tmp_path: Path, kms: KmsProcess) -> None:
    img = new_image(tmp_path / "vol.img")
    key = write_key(tmp_path / "k", os.urandom(32))
    rec = write_key(tmp_path / "rec", b"recovery passphrase")
    dead = [
        "--kms",
        "http://127.0.0.1:9",
        "--app-id",
        APP_A.hex(),
        "--attester",
        "simulated",
        "--compose-hash",
        COMPOSE_A.hex(),
        "--volume-id",
        VOLUME,
        "--kms-deadline",
        "0.5",
        "--kms-public-key",
        kms.public_key.hex(),
    ]
    unpinned = dead[:-2]
    cases: list[tuple[list[str], int, str]] = [
        (["format", str(img), *dead], 8, "not available"),
        (["format", str(img), *unpinned], 2, "no trusted KMS identity"),
        (["format", str(img), *unpinned, "--kms-public-key", "abcd"], 2, "64 hex digits"),
        (["format", str(img), *kms_args(kms, volume=None)], 2, "--volume-id"),
        (["format", str(img), "--kms", kms.url, "--volume-id", VOLUME], 2, "--app-id"),
        (["format", str(img), *kms_args(kms), "--key-file", str(key)], 2, "exactly one"),
        (["format", str(img)], 2, "exactly one"),
        (["format", str(img), *kms_args(kms, app=b"\x01" * 65)], 8, "app id"),
        (
            ["check-key", str(img), *kms_args(kms), "--recovery-slot", "--use-recovery"],
            2,
            "from --key-file",
        ),
        (
            ["open", str(img), "x", *kms_args(kms), "--recovery-slot", "--use-recovery"],
            2,
            "from --key-file",
        ),
    ]
    if not cs.device_mapper_available():
        cases.append(
            (
                [
                    "up",
                    str(img),
                    "x",
                    "--fs",
                    "none",
                    *kms_args(kms),
                    "--recovery-key-file",
                    str(rec),
                ],
                10,
                "device-mapper",
            )
        )
    for args, code, text in cases:
        res = sealfs_cli("luks", *args)
        assert res.returncode == code, (args, res.stderr)
        if code:
            assert text in one_error_line(res.stderr), (args, res.stderr)
    assert not any(A.read_region(img)[:4096])  # nothing was formatted by a failed command


def test_recovery_slot_next_to_the_kms_slot(tmp_path: Path, kms: KmsProcess) -> None:
    img = new_image(tmp_path / "vol.img")
    rec = write_key(tmp_path / "rec", b"a recovery passphrase for the kms volume\n")
    res = sealfs_cli(
        "luks",
        "format",
        str(img),
        *kms_args(kms),
        "--recovery-key-file",
        str(rec),
        "--recovery-iter-time",
        "100",
    )
    assert res.returncode == 0, res.stderr
    ok = sealfs_cli("luks", "check-key", str(img), *kms_args(kms), "--recovery-slot")
    assert ok.returncode == 0, ok.stderr
    res = sealfs_cli(
        "luks", "check-key", str(img), "--key-file", str(rec), "--recovery-slot", "--use-recovery"
    )
    assert res.returncode == 0 and "key slot 1" in res.stdout, res.stderr
    # The recovery passphrase does not open the KMS slot, nor the KMS key the recovery slot.
    assert not A.cryptsetup_unlocks(img, rec.read_bytes(), keyslot=0)
    assert not A.cryptsetup_unlocks(img, fetch(kms), keyslot=1)


def test_key_version_recorded_rotation_and_host_edits(tmp_path: Path) -> None:
    """The host can edit the recorded key version; that only selects another version of this
    volume's own key, which does not open the slot (or a version the KMS refuses). Rotating
    the app's current version leaves existing volumes on the version they were formatted
    with."""
    state = make_state(tmp_path / "kms")
    server = start_kms(state, "--allow-simulated")
    try:
        img = new_image(tmp_path / "v1.img")
        src = source(server)
        binding = src.binding(VOLUME)
        new = src.new_key(binding)
        assert new.key_version == 1
        format_volume(str(img), new.passphrase, P.LuksProfile(), key_version=1)

        def opens(path: Path) -> int:
            res = sealfs_cli("luks", "check-key", str(path), *kms_args(server))
            if res.returncode:
                one_error_line(res.stderr)
            return res.returncode

        v2 = Path(shutil.copyfile(img, tmp_path / "v2.img"))
        A.edit_binary(v2, SUBSYSTEM_OFFSET, b"sealfs-kms-v2")
        assert opens(v2) == 8  # the KMS has no version 2 yet: bad_key_version
        none = Path(shutil.copyfile(img, tmp_path / "none.img"))
        A.edit_binary(none, SUBSYSTEM_OFFSET, bytes(48))
        res = sealfs_cli("luks", "check-key", str(none), *kms_args(server))
        assert res.returncode == 10 and "no KMS key version" in one_error_line(res.stderr)

        state.put(sim_policy(APP_A, COMPOSE_A, key_version=2))  # sealfs kms policy rotate
        assert opens(img) == 0  # still version 1, still derivable
        assert opens(v2) == 3  # version 2 of this volume's key: not the one in slot 0
        fresh = new_image(tmp_path / "fresh.img")
        res = sealfs_cli("luks", "format", str(fresh), *kms_args(server), "--json")
        assert json.loads(res.stdout)["kms_key_version"] == 2, res.stderr
        assert opens(fresh) == 0
        check_volume_key(
            str(fresh),
            lambda info: src.existing_key(binding, info.kms_key_version),
            P.LuksProfile(),
        )
    finally:
        server.stop()


def test_shell_tool_with_kms(tmp_path: Path, kms: KmsProcess) -> None:
    img = new_image(tmp_path / "vol.img")
    res = sealfs_cli("luks", "format", str(img), *kms_args(kms))
    assert res.returncode == 0, res.stderr
    env = {
        "SEALFS_KMS": kms.url,
        "SEALFS_APP_ID": APP_A.hex(),
        "SEALFS_ATTESTER": "simulated",
        "SEALFS_COMPOSE_HASH": COMPOSE_A.hex(),
        "SEALFS_VOLUME_ID": VOLUME,
        "SEALFS_KMS_DEADLINE": "5",
        "SEALFS_KMS_PUBLIC_KEY": kms.public_key.hex(),
    }
    res = run_tool("check-key", str(img), env=env)
    assert res.returncode == 0 and "opens key slot 0" in res.stdout, res.stderr
    res = run_tool("check-key", str(img), env={**env, "SEALFS_VOLUME_ID": "other"})
    assert res.returncode == 3, res.stderr
    res = run_tool(
        "check-key", str(img), env={k: v for k, v in env.items() if k != "SEALFS_VOLUME_ID"}
    )
    assert res.returncode == 2 and "SEALFS_VOLUME_ID" in one_error_line(res.stderr)
    res = run_tool(
        "check-key", str(img), env={k: v for k, v in env.items() if k != "SEALFS_APP_ID"}
    )
    assert res.returncode == 2 and "SEALFS_APP_ID" in one_error_line(res.stderr)
    if not cs.device_mapper_available():
        res = run_tool("up", str(img), "data", str(tmp_path / "m"), env=env)
        assert res.returncode == 10
        assert one_error_line(res.stderr) == "sealfs: error: " + cs.NO_DEVICE_MAPPER


@pytest.mark.parametrize("crash", [None, "same-version", "rotated-again"])
def test_rekey_moves_slot_0_to_the_current_kms_key_version(
    tmp_path: Path, crash: str | None
) -> None:
    """After `kms policy rotate`, a rekey re-encrypts under a new volume key whose slot 0 is the
    current version's passphrase; the old version's passphrase opens nothing any more. A run
    killed between adding the staging slot and recording its version continues, also when the
    KMS rotated once more in between (the staged slot is then wiped and staged again)."""
    from .test_rekey import plaintext, volume_key

    state = make_state(tmp_path / "kms")
    server = start_kms(state, "--allow-simulated")
    try:
        img = new_image(tmp_path / "v.img", P.DATA_OFFSET + 4 * 1024 * 1024)
        res = sealfs_cli("luks", "format", str(img), *kms_args(server), "--json")
        assert json.loads(res.stdout)["kms_key_version"] == 1, res.stderr
        with open(img, "r+b") as f:
            f.seek(P.DATA_OFFSET)
            f.write(os.urandom(4 * 1024 * 1024))
        v1 = write_key(tmp_path / "v1", fetch(server, version=1))
        before = plaintext(img, volume_key(img, v1))
        state.put(sim_policy(APP_A, COMPOSE_A, key_version=2))  # sealfs kms policy rotate
        rekey = ["luks", "rekey", str(img), *kms_args(server), "--json"]
        expected = 2
        if crash:
            env = {"SEALFS_FAILPOINT": "luks:rekey-staging-slot-added"}
            assert sealfs_cli(*rekey, env=env).returncode == -9
            if crash == "rotated-again":
                state.put(sim_policy(APP_A, COMPOSE_A, key_version=3))
                expected = 3
        res = sealfs_cli(*rekey)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["kms_key_version"] == expected and out["resumed"] == bool(crash)
        assert sealfs_cli("luks", "check-key", str(img), *kms_args(server)).returncode == 0
        assert sealfs_cli("luks", "check-key", str(img), "--key-file", str(v1)).returncode == 3
        current = write_key(tmp_path / "cur", fetch(server, version=expected))
        assert plaintext(img, volume_key(img, current)) == before
        listed = json.loads(sealfs_cli("luks", "key", "list", str(img), "--json").stdout)
        assert [s["kms_key_version"] for s in listed["slots"]] == [expected]
    finally:
        server.stop()
