"""The init volume list: every field, wrong, gives an error naming file:line and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sealfs.init.config import DEFAULT_EVENT_LOG, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
KEY = "ab" * 32

GOOD = f"""\
[kms]
urls = ["http://10.0.2.2:8750", "https://kms2:8750"]
public_keys = ["{KEY}"]
app_id = "a1a1"
attester = "simulated"
deadline = 60

[init]
runtime_dir = "/run/sealfs/init"

[[volume]]
name = "data"
kind = "sealfs"
backing = "/var/lib/sealfs/data"
mountpoint = "/mnt/data"
create = "first-boot"
compression = "none"
owner = "1000:1000"
mode = "0750"

[[volume]]
name = "db"
kind = "luks"
device = "/dev/vdb"
mountpoint = "/mnt/db"
filesystem = "ext4"
integrity = false
create = "first-boot"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "volumes.toml"
    path.write_text(text)
    return path


def test_the_documented_example_parses(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.kms.urls == ("http://10.0.2.2:8750", "https://kms2:8750")
    assert cfg.kms.public_keys == (bytes.fromhex(KEY),)
    assert cfg.kms.app_id == bytes.fromhex("a1a1") and cfg.kms.deadline == 60.0
    assert str(cfg.kms.event_log) == DEFAULT_EVENT_LOG
    data, db = cfg.volumes
    assert (data.name, data.kind, str(data.source), data.create) == (
        "data",
        "sealfs",
        "/var/lib/sealfs/data",
        True,
    )
    assert data.owner == (1000, 1000) and data.mode == 0o750
    assert (db.kind, str(db.source), db.filesystem, db.integrity) == (
        "luks",
        "/dev/vdb",
        "ext4",
        False,
    )


def test_the_docs_example_is_the_same_shape(tmp_path: Path) -> None:
    """docs/init.md shows the schema; its example must parse (placeholders filled in)."""
    doc = (REPO / "docs/init.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    text = example.replace('"<hex>"', f'"{KEY}"')
    cfg = load_config(write(tmp_path, text))
    assert [v.name for v in cfg.volumes] == ["data", "db"]


# (what to replace, with what, the line it must name, the field it must name, a word of why)
BAD = [
    ('urls = ["http://10.0.2.2:8750", "https://kms2:8750"]', "urls = []", 2, "kms.urls", "list"),
    ('"http://10.0.2.2:8750", ', '"ftp://x", ', 2, "kms.urls", "URL"),
    (f'public_keys = ["{KEY}"]', 'public_keys = ["abcd"]', 3, "kms.public_keys", "Ed25519"),
    ('app_id = "a1a1"', 'app_id = "xyz"', 4, "kms.app_id", "hex"),
    ('app_id = "a1a1"', 'app_id_file = "/nonexistent/app-id"', 4, "kms.app_id_file", "read"),
    ('app_id = "a1a1"\n', "", 1, "kms", "app_id"),
    ('attester = "simulated"', 'attester = "sgx"', 5, "kms.attester", "one of"),
    ("deadline = 60", "deadline = 0", 6, "kms.deadline", "seconds"),
    ("deadline = 60", 'deadline = "60"', 6, "kms.deadline", "seconds"),
    ("deadline = 60", 'event_log = "run/log"', 6, "kms.event_log", "absolute"),
    ("deadline = 60", 'colour = "blue"', 6, "kms.colour", "unknown field"),
    ('runtime_dir = "/run/sealfs/init"', 'runtime_dir = "x"', 9, "init.runtime_dir", "absolute"),
    ('name = "data"', 'name = "-data"', 12, "volume[0].name", "characters"),
    ('kind = "sealfs"', 'kind = "zfs"', 13, "volume[0].kind", "one of"),
    ('backing = "/var/lib/sealfs/data"', 'backing = "data"', 14, "volume[0].backing", "absolute"),
    ('backing = "/var/lib/sealfs/data"', 'device = "/dev/x"', 14, "volume[0].device", "unknown"),
    ('mountpoint = "/mnt/data"', 'moutpoint = "/mnt/data"', 15, "volume[0].moutpoint", "unknown"),
    ('mountpoint = "/mnt/data"', 'mountpoint = "/mnt/db"', 25, "volume[1].mountpoint", "already"),
    (
        'create = "first-boot"\ncompression',
        'create = "always"\ncompression',
        16,
        "volume[0].create",
        "one of",
    ),
    ('compression = "none"', 'compression = "zstd"', 17, "volume[0].compression", "one of"),
    ('owner = "1000:1000"', 'owner = "app:app"', 18, "volume[0].owner", "uid:gid"),
    ('mode = "0750"', 'mode = "0800"', 19, "volume[0].mode", "octal"),
    ('mode = "0750"', "mode = 750", 19, "volume[0].mode", "string"),
    ('name = "db"', 'name = "data"', 22, "volume[1].name", "already"),
    ('device = "/dev/vdb"', 'device = "vdb"', 24, "volume[1].device", "absolute"),
    ('filesystem = "ext4"', 'filesystem = "btrfs"', 26, "volume[1].filesystem", "one of"),
    ("integrity = false", 'integrity = "no"', 27, "volume[1].integrity", "true or false"),
    ('filesystem = "ext4"', 'compression = "lz4"', 26, "volume[1].compression", "unknown"),
]


@pytest.mark.parametrize(
    "old,new,line,field,why", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)]
)
def test_each_wrong_field_is_named_with_its_line(
    tmp_path: Path, old: str, new: str, line: int, field: str, why: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.startswith(f"{path}:{line}: {field}"), e.value.message
    assert why in e.value.message
    assert "\n" not in e.value.message


def test_syntax_errors_and_missing_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r":3: not valid TOML"):
        load_config(write(tmp_path, "[kms]\nurls = [\n= 1\n"))
    with pytest.raises(ConfigError, match="kmz: unknown table"):
        load_config(write(tmp_path, GOOD.replace("[kms]", "[kmz]")))
    with pytest.raises(ConfigError, match="missing the \\[kms\\] table"):
        load_config(
            write(tmp_path, GOOD.replace("[kms]", "[init]", 1).replace("[init]\nrun", "run"))
        )
    with pytest.raises(ConfigError, match="at least one \\[\\[volume\\]\\]"):
        load_config(write(tmp_path, GOOD.split("[[volume]]")[0]))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_the_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('mode = "0750"', 'mode = "rwx"'))
    for command in ("up", "down", "status"):
        res = subprocess.run(
            [sys.executable, "-m", "sealfs", "init", command, str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert res.returncode == 2, res.stderr
        assert (
            res.stderr
            == f"sealfs: error: {path}:19: volume[0].mode: 'rwx' is not an octal mode (e.g. \"0750\")\n"
        )
