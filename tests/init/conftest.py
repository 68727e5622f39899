"""CVM init fixtures: a real KMS on 127.0.0.1 (simulated TEEs allowed), and a fake CVM — a
directory holding its volume list, backing directories, mountpoints, /run — that can be
booted with `sealfs init up`, shut down, or lose power."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sealfs.fuse.mount import is_mounted, runtime_file
from tests.kms.conftest import APP_A, COMPOSE_A, KmsProcess, make_state, start_kms

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsProcess]:
    server = start_kms(make_state(tmp_path_factory.mktemp("kms")), "--allow-simulated")
    yield server
    server.stop()


def dead_url() -> str:
    """A URL on which nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Vol:
    name: str
    backing: Path  # the backing directory, or the LUKS device (an image file)
    mnt: Path
    create: str = "first-boot"
    kind: str = "sealfs"


@dataclass
class Cvm:
    root: Path
    kms: KmsProcess
    volumes: list[Vol] = field(default_factory=list)

    @property
    def runtime(self) -> Path:
        return self.root / "run" / "init"

    @property
    def event_log(self) -> Path:
        return self.root / "run" / "log" / "runtime_events.log"

    def add(self, name: str, create: str = "first-boot") -> Vol:
        vol = Vol(name, self.root / "disk" / name, self.root / "mnt" / name, create)
        self.volumes.append(vol)
        return vol

    def add_luks(self, name: str, image: Path, create: str = "first-boot") -> Vol:
        vol = Vol(name, image, self.root / "mnt" / name, create, "luks")
        self.volumes.append(vol)
        return vol

    def config(self, urls: list[str] | None = None, deadline: float = 30) -> Path:
        urls = urls if urls is not None else [self.kms.url]
        text = f"""\
[kms]
urls = {json.dumps(urls)}
public_keys = ["{self.kms.public_key.hex()}"]
app_id = "{APP_A.hex()}"
attester = "simulated"
compose_hash = "{COMPOSE_A.hex()}"
deadline = {deadline}
event_log = "{self.event_log}"

[init]
runtime_dir = "{self.runtime}"
"""
        for v in self.volumes:
            text += f"""
[[volume]]
name = "{v.name}"
kind = "{v.kind}"
{"backing" if v.kind == "sealfs" else "device"} = "{v.backing}"
mountpoint = "{v.mnt}"
create = "{v.create}"
owner = "1000:1000"
mode = "0750"
"""
        path = self.root / f"volumes-{abs(hash(text))}.toml"
        path.write_text(text)
        return path

    def init(
        self,
        command: str,
        config: Path | None = None,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sealfs", "init", command, str(config or self.config()), *extra],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            timeout=300,
        )

    def up(self, config: Path | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
        res = self.init("up", config, **kw)
        assert res.returncode == 0, res.stderr
        return res

    def status(self) -> dict[str, dict[str, Any]]:
        res = self.init("status", None, "--json")
        assert res.returncode == 0, res.stderr
        return {v["name"]: v for v in json.loads(res.stdout)["volumes"]}

    def mounted(self) -> list[str]:
        return [v.name for v in self.volumes if is_mounted(v.mnt)]

    def shutdown(self) -> None:
        """A clean reboot: `init down`, then /run is gone."""
        res = self.init("down")
        assert res.returncode == 0, res.stderr
        self._clear_run()

    def power_loss(self) -> None:
        """Every daemon dies at once (SIGKILL), mounts are detached, /run is gone.

        A daemon killed while one of its threads waits on a request to its own mount (the
        readahead tuning stats it) cannot exit until the FUSE connection is aborted, which
        a forced unmount does; a real power loss has no such afterlife."""
        for v in self.volumes:
            if v.kind != "sealfs":
                continue
            try:
                pid = json.loads(runtime_file(v.mnt.absolute()).read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
            if is_mounted(v.mnt):
                subprocess.run(["umount", "-f", str(v.mnt)], capture_output=True)
            if is_mounted(v.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(v.mnt)], capture_output=True)
            guard = time.monotonic() + 60
            while is_mounted(v.mnt):
                assert time.monotonic() < guard, f"{v.mnt} stays mounted"
                time.sleep(0.02)
        self._clear_run()
        self._wait_unlocked()

    def _wait_unlocked(self) -> None:
        """A killed daemon's volume lock goes with its process; wait for the exit."""
        from sealfs.store import ObjectStore

        for v in self.volumes:
            if v.kind != "sealfs" or not (v.backing / "lock").exists():
                continue
            store = ObjectStore(v.backing)
            guard = time.monotonic() + 60
            while store.is_locked():
                assert time.monotonic() < guard, f"{v.backing} stays locked"
                time.sleep(0.02)
            store.close()

    def _clear_run(self) -> None:
        subprocess.run(["rm", "-rf", str(self.root / "run")], check=True)


@pytest.fixture
def cvm(tmp_path: Path, kms: KmsProcess) -> Iterator[Cvm]:
    machine = Cvm(tmp_path, kms)
    yield machine
    machine.power_loss()
