"""``tools/profile-sealfs``: one workload on a fresh sealfs mount, with py-spy sampling the daemon.

Writes, into the output directory: ``stacks.txt`` (py-spy's collapsed stacks), ``flame.svg``
(a flame graph, open it in a browser), ``summary.txt`` (hottest functions by own and inclusive
time) and ``figures.json`` (the workload's own figures, slowed down by sampling).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import filesystems, flamegraph, source_tree, system, workloads
from .runner import DEFAULT_SCRATCH, parse_size
from .system import log
from .workloads import Ctx, Params


def ensure_py_spy() -> Path:
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        log("installing py-spy into the venv")
        system.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], timeout=600)
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/profile-sealfs", description=__doc__)
    ap.add_argument("--workload", default="seqwrite", choices=[w.name for w in workloads.ALL])
    ap.add_argument("--compression", choices=["lz4"], help="profile a compressed volume")
    ap.add_argument(
        "--quick", action="store_true", help="the smaller sizes of `tools/bench --quick`"
    )
    ap.add_argument("--size", type=parse_size, help="sequential size (default 1G, quick 256M)")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--idle", action="store_true", help="include idle (waiting) threads")
    ap.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    ap.add_argument("--native", action="store_true", help="include native (C) frames")
    ap.add_argument("--out", type=Path, help="output directory (default under the scratch dir)")
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    ap.add_argument("--sealfs", type=Path, help="sealfs binary (default: the repo's .venv)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("must run as root")

    params = Params.quick() if args.quick else Params()
    if args.size:
        params.seq_size = args.size
    wl = workloads.BY_NAME[args.workload]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or args.scratch / f"profile-{args.workload}-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    py_spy = ensure_py_spy()
    system.ensure_commands({"fusermount3": "fuse3", **wl.needs})
    if wl.name == "tree":
        tar, nfiles, desc = source_tree.prepare(args.scratch / "cache")
        params.tree_tar, params.tree_files, params.tree_name = str(tar), nfiles, desc

    cls = filesystems.SealfsLz4 if args.compression else filesystems.Sealfs
    root = args.scratch / f"profile-run-{os.getpid()}"
    fs = cls(root, args.sealfs)
    why = fs.available()
    if why:
        log(f"sealfs not usable: {why}")
        return 2
    spy: subprocess.Popen | None = None
    try:
        fs.setup()
        if not fs.pid:
            raise RuntimeError("cannot find the sealfs daemon's pid")
        ctx = Ctx(fs=fs, dir=fs.data / f"bench-{wl.group}", params=params, scratch=root)
        ctx.dir.mkdir(parents=True, exist_ok=True)
        ctx.deadline = time.monotonic() + 3600
        wl.prepare(ctx)
        stacks = out / "stacks.txt"
        cmd = [
            str(py_spy),
            "record",
            "--pid",
            str(fs.pid),
            "--rate",
            str(args.rate),
            "--format",
            "raw",
            "--output",
            str(stacks),
            "--subprocesses",
            "--threads",
        ]
        cmd += ["--idle"] if args.idle else []
        cmd += ["--gil"] if args.gil else []
        cmd += ["--native"] if args.native else []
        log(f"sampling daemon {fs.pid}: {' '.join(cmd)}")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out / "py-spy.log", "w"))  # noqa: SIM115
        time.sleep(1.0)  # let py-spy attach
        t_spy = time.monotonic()
        log(f"running {wl.name}")
        figures = wl.run(ctx)
        log("figures: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
        time.sleep(0.5)
        sampled = time.monotonic() - t_spy
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=120)
        spy = None
        wl.cleanup(ctx)
        samples = flamegraph.read_collapsed(stacks)
        title = f"sealfs daemon, {wl.name}" + (" (lz4)" if args.compression else "")
        (out / "flame.svg").write_text(flamegraph.svg(samples, title))
        (out / "summary.txt").write_text(
            f"{title}: {sampled:.1f}s sampled at {args.rate}/s; figures (slowed by sampling): "
            + ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
            + "\n\n"
            + flamegraph.summary(samples, expected_per_thread=sampled * args.rate)
        )
        (out / "figures.json").write_text(
            json.dumps(
                {
                    "workload": wl.name,
                    "compression": args.compression,
                    "figures": figures,
                    "params": params.describe(),
                },
                indent=2,
            )
            + "\n"
        )
        print((out / "summary.txt").read_text())
        log(f"wrote {out}/flame.svg, summary.txt, stacks.txt")
        return 0
    finally:
        if spy is not None:
            spy.kill()
        fs.unmount()
        if not system.is_mounted(fs.mnt):
            shutil.rmtree(root, ignore_errors=True)
