"""tools/bench-kms runs end to end and stops by itself: a tiny load against 1 and 2 real
replicas, every operation answered, on a SQLite state and on a throwaway PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools.bench_lib.postgres import missing

from .conftest import REPO


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_bench_kms_smoke(store: str) -> None:
    extra = []
    if store == "postgresql":
        reason = missing()
        if reason is not None:
            pytest.skip(reason)
        extra = ["--postgres-temp"]
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "bench-kms"),
            "--clients",
            "3",
            "--ops",
            "2",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["state"] == store
    runs = {(r["replicas"], r["op"]): r for r in doc["runs"]}
    assert set(runs) == {(1, "key"), (1, "advance"), (2, "key"), (2, "advance")}
    for r in runs.values():
        assert (r["ops"], r["errors"]) == (6, 0)
        assert r["p50_ms"] <= r["p99_ms"]
        # the database's own CPU is measured where the tool runs the database
        assert (r["db_cpu_ms_per_op"] is not None) == (store == "postgresql")
    assert doc["step_costs"]["state_advance_ms"] is not None


def test_bench_kms_refuses_two_states() -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench-kms"), "--state", "x", "--postgres-temp"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode != 0
    assert res.stderr.strip() == "bench-kms: --state and --postgres-temp exclude each other"
