"""The "real source tree" of the untar / ls -lR / rm -rf workload, built once into a cache.

First choice: the Django 5.1.4 source distribution (6,809 files in 3,233 directories: Python,
templates, JavaScript, CSS, translations), fetched once with ``pip download`` from the package
index and stored uncompressed so that the workload times the filesystem, not gunzip. Without a
package index, a local tree of at least 5,000 files is archived instead (/usr/include, then a
Python standard library), and the report says which.
"""

from __future__ import annotations

import gzip
import shutil
import sys
import tarfile
from pathlib import Path

from .system import CommandError, log, run

SDIST = "Django==5.1.4"
MIN_FILES = 5000
LOCAL_CANDIDATES = ["/usr/include", "/usr/lib/python3.11", "/usr/lib/python3"]


def _count(tar: Path) -> int:
    with tarfile.open(tar) as t:
        return sum(1 for m in t if m.isfile())


def _decompress(src: Path, dst: Path) -> None:
    tmp = dst.with_suffix(".tmp")
    with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    tmp.rename(dst)


def _from_sdist(cache: Path) -> Path | None:
    name = SDIST.replace("==", "-").lower()
    tar = cache / f"{name}.tar"
    if tar.exists():
        return tar
    dl = cache / "download"
    dl.mkdir(parents=True, exist_ok=True)
    log(f"source tree: pip download {SDIST} (sdist, once) into {dl}")
    try:
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-build-isolation",
                "-d",
                dl,
                SDIST,
            ],
            timeout=600,
        )
    except (CommandError, OSError) as e:
        log(f"source tree: pip download failed ({str(e)[:200]})")
        return None
    found = [
        p for p in dl.iterdir() if p.name.lower().startswith(name) and p.name.endswith(".tar.gz")
    ]
    if not found:
        return None
    _decompress(found[0], tar)
    return tar


def _from_local(cache: Path) -> Path | None:
    for cand in LOCAL_CANDIDATES:
        src = Path(cand)
        if not src.is_dir():
            continue
        tar = cache / f"local{src.as_posix().replace('/', '-')}.tar"
        if not tar.exists():
            log(f"source tree: archiving {src}")
            tmp = tar.with_suffix(".tmp")
            run(["tar", "-cf", tmp, "-C", src.parent, src.name], timeout=600, check=False)
            tmp.rename(tar)
        if _count(tar) >= MIN_FILES:
            return tar
    return None


def prepare(cache: Path, given: str | None = None) -> tuple[Path, int, str]:
    """Return (uncompressed tarball, regular files in it, description)."""
    cache.mkdir(parents=True, exist_ok=True)
    if given:
        src = Path(given)
        if src.suffix == ".gz" or src.name.endswith(".tgz"):
            tar = cache / (src.name.removesuffix(".gz").removesuffix(".tgz") + ".tar")
            if not tar.exists():
                _decompress(src, tar)
        else:
            tar = src
        return tar, _count(tar), src.name
    tar = _from_sdist(cache)
    if tar:
        return tar, _count(tar), f"{SDIST} sdist"
    tar = _from_local(cache)
    if tar:
        return tar, _count(tar), f"local {tar.stem.removeprefix('local').replace('-', '/')}"
    raise RuntimeError("no source tree of >= 5,000 files available (use --tree-tar)")
