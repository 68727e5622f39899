"""One adapter per filesystem under test.

Each adapter owns a fresh directory ``root`` (on the scratch disk) holding its backing directory,
mountpoint and secrets, and knows how to create, mount, unmount and find its FUSE daemon.
``data`` is the directory the workloads run in.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from . import system
from .system import CommandError, log, run

REPO = Path(__file__).resolve().parents[2]


class FileSystem:
    name = ""
    label = ""
    fuse = True
    #: command -> Debian package needed by this filesystem
    packages: dict[str, str] = {}

    def __init__(self, root: Path):
        self.root = root
        self.backing = root / "backing"
        self.mnt = root / "mnt"
        self.pid: int | None = None
        self.conn: str | None = None
        self.mounted = False

    @property
    def data(self) -> Path:
        return self.mnt

    # Subclasses implement these.
    def available(self) -> str | None:
        """None if this filesystem can be benchmarked here, else why not."""
        for cmd in self.packages:
            if shutil.which(cmd) is None:
                return f"{cmd} not installed"
        return None

    def version(self) -> str:
        return ""

    def create(self) -> None:
        raise NotImplementedError

    def _mount(self) -> None:
        raise NotImplementedError

    def _unmount(self) -> None:
        system.fuse_unmount(self.mnt)

    # Shared behaviour.
    def setup(self) -> None:
        """Fresh backing directory and mountpoint, new volume, mounted."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.backing.mkdir(parents=True)
        self.mnt.mkdir()
        self.create()
        self.mount()

    def mount(self) -> None:
        self._mount()
        if self.fuse:
            system.wait_mounted(self.mnt)
            self.conn = system.fuse_connection(self.mnt)
            self.pid = system.find_fuse_daemon(self.mnt)
            if self.pid is None:
                log(f"{self.name}: warning: cannot find the FUSE daemon's pid (no RSS figures)")
        self.mounted = True

    def unmount(self) -> None:
        """Clean unmount; waits for the daemon to finish writing back and exit."""
        if not self.fuse:
            self.mounted = False
            return
        if system.is_mounted(self.mnt):
            try:
                self._unmount()
            except (CommandError, OSError, subprocess.SubprocessError) as e:
                log(f"{self.name}: unmount failed ({e}); falling back to fusermount3")
                system.fuse_unmount(self.mnt)
        if self.pid and not system.wait_pid_exit(self.pid, timeout=120):
            log(f"{self.name}: daemon {self.pid} still alive 120s after unmount; killing it")
            system.kill_pid(self.pid)
        self.mounted = False

    def alive(self) -> bool:
        if not self.fuse:
            return True
        return system.is_mounted(self.mnt) and (self.pid is None or system.pid_alive(self.pid))

    def emergency_stop(self) -> None:
        """Used on timeouts, Ctrl-C and crashes: make blocked I/O fail, then get rid of the mount."""
        if not self.fuse:
            return
        system.abort_fuse(self.conn)
        if system.is_mounted(self.mnt):
            system.run(["fusermount3", "-uz", self.mnt], check=False, timeout=30)
        system.kill_pid(self.pid)
        self.mounted = False


class Plain(FileSystem):
    name = "plain"
    label = "plain dir"
    fuse = False

    def version(self) -> str:
        return "(no filesystem layer: a directory on the backing disk)"

    def create(self) -> None:
        pass

    def _mount(self) -> None:
        pass

    @property
    def data(self) -> Path:
        return self.backing


class Gocryptfs(FileSystem):
    name = "gocryptfs"
    label = "gocryptfs"
    packages = {"gocryptfs": "gocryptfs", "fusermount3": "fuse3"}

    def version(self) -> str:
        return system.first_line(["gocryptfs", "-version"])

    @property
    def passfile(self) -> Path:
        return self.root / "password"

    def create(self) -> None:
        self.passfile.write_text("sealfs-bench-password\n")
        self.passfile.chmod(0o600)
        run(["gocryptfs", "-init", "-q", "-passfile", self.passfile, self.backing], timeout=120)

    def _mount(self) -> None:
        run(
            ["gocryptfs", "-q", "-nosyslog", "-passfile", self.passfile, self.backing, self.mnt],
            timeout=120,
        )


class Cryfs(FileSystem):
    name = "cryfs"
    label = "CryFS"
    packages = {"cryfs": "cryfs", "fusermount3": "fuse3"}

    @property
    def env(self) -> dict[str, str]:
        # CryFS keeps per-user state under $HOME/.local/share/cryfs; keep it in our scratch dir.
        return {
            "HOME": str(self.root / "home"),
            "CRYFS_FRONTEND": "noninteractive",
            "CRYFS_NO_UPDATE_CHECK": "true",
        }

    def version(self) -> str:
        line = system.first_line(["cryfs", "--version"], r"CryFS Version")
        return line.replace("CryFS Version", "cryfs").strip()

    def create(self) -> None:
        (self.root / "home").mkdir()
        # CryFS creates the volume on its first mount (default cipher xchacha20-poly1305,
        # 16 KiB blocks); nothing to do here.

    def _mount(self) -> None:
        run(
            ["cryfs", self.backing, self.mnt],
            input=b"sealfs-bench-password\n",
            env=self.env,
            timeout=300,
        )


class Sealfs(FileSystem):
    name = "sealfs"
    label = "sealfs"
    packages = {"fusermount3": "fuse3"}
    compression: str | None = None

    def __init__(self, root: Path, binary: Path | None = None):
        super().__init__(root)
        self.binary = binary or default_sealfs_binary()

    @property
    def keyfile(self) -> Path:
        return self.root / "volume.key"

    def available(self) -> str | None:
        why = super().available()
        if why:
            return why
        if not self.binary.exists():
            return f"{self.binary} does not exist (run `make setup`)"
        code, text = run([self.binary, "create", "--help"], check=False, timeout=60)
        if code != 0:
            return f"`sealfs create` not available yet: {text.strip().splitlines()[-1:]}"
        return None

    def version(self) -> str:
        ver = system.first_line([str(self.binary), "--version"])
        commit = system.first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
        return f"{ver} (git {commit})" if commit else ver

    def create(self) -> None:
        fd = os.open(self.keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        cmd = [self.binary, "create", self.backing, "--key-file", self.keyfile]
        if self.compression:
            cmd += ["--compression", self.compression]
        run(cmd, timeout=120)

    def _mount(self) -> None:
        run([self.binary, "mount", self.backing, self.mnt, "--key-file", self.keyfile], timeout=120)

    def _unmount(self) -> None:
        run([self.binary, "umount", self.mnt], timeout=300)


class SealfsLz4(Sealfs):
    name = "sealfs-lz4"
    label = "sealfs+lz4"
    compression = "lz4"


class SealfsB(Sealfs):
    """A second sealfs build (another commit or option) in the same run, for A/B comparisons:
    interleaved with ``sealfs`` under the same load, which separate runs cannot give."""

    name = "sealfs-b"
    label = "sealfs (B)"

    def __init__(self, root: Path, binary: Path | None = None):
        super().__init__(root, Path(os.environ.get("SEALFS_B_BIN", "")) or binary)

    def available(self) -> str | None:
        if not os.environ.get("SEALFS_B_BIN"):
            return "SEALFS_B_BIN (the B build's sealfs binary) is not set"
        return super().available()

    def version(self) -> str:
        return f"{system.first_line([str(self.binary), '--version'])} ({self.binary})"


def default_sealfs_binary() -> Path:
    env = os.environ.get("SEALFS_BIN")
    if env:
        return Path(env)
    return REPO / ".venv" / "bin" / "sealfs"


ALL: list[type[FileSystem]] = [Plain, Gocryptfs, Cryfs, Sealfs, SealfsLz4, SealfsB]
BY_NAME = {cls.name: cls for cls in ALL}


def short_version(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
