"""tools/bench-kms runs end to end and stops by itself: a tiny load against 1 and 2 real
replicas, every operation answered."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import REPO


def test_bench_kms_smoke() -> None:
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "bench-kms"),
            "--clients",
            "3",
            "--ops",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    runs = {(r["replicas"], r["op"]): r for r in doc["runs"]}
    assert set(runs) == {(1, "key"), (1, "advance"), (2, "key"), (2, "advance")}
    for r in runs.values():
        assert (r["ops"], r["errors"]) == (6, 0)
        assert r["p50_ms"] <= r["p99_ms"]
    assert doc["step_costs"]["state_advance_ms"] is not None
