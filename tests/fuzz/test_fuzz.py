"""Every parser of attacker bytes, fuzzed (issue 10, item 8): the committed seed corpus is
replayed in-process, then each target runs a short, deterministic atheris session (a fixed
number of inputs, a fixed seed). Any input that makes a parser raise anything but the
project's own errors fails the test; ``tools/fuzz TARGET --minutes N`` runs longer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS, check

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CORPUS = HERE / "corpus"
RUNS = 2000  # per target in the suite; enough to mutate past every seed, bounded by work


def seeds(name: str) -> list[Path]:
    return sorted((CORPUS / name).glob("*"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seed_corpus_replays_cleanly(name: str) -> None:
    files = seeds(name)
    assert files, f"no seed corpus for {name}"
    for path in files:
        check(name, path.read_bytes())  # a finding raises and names its exception


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_short_fuzz_run_finds_nothing(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is in the dev extras")
    work = tmp_path / "corpus"
    shutil.copytree(CORPUS / name, work)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.driver",
            name,
            f"-runs={RUNS}",
            "-seed=1",
            "-max_len=16384",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
            str(work),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert res.returncode == 0 and not crashes, f"{name}: finding {crashes}\n{res.stderr[-4000:]}"
