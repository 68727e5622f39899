"""AppPolicy's retired key versions: stored with a default so older policy rows still load,
parsed strictly, and retiring refuses what would break live volumes."""

from __future__ import annotations

from typing import Any

import pytest

from sealfs.errors import UsageError
from sealfs.kms.policy import AppPolicy

from .conftest import APP_A, COMPOSE_A, sim_policy


def test_policies_written_before_the_field_keep_every_version_live() -> None:
    written_before = sim_policy(APP_A, COMPOSE_A, key_version=3).to_dict()
    del written_before["retired_versions"]
    policy = AppPolicy.from_dict(written_before)
    assert policy.retired_versions == () and policy.live_versions() == [1, 2, 3]
    retired = policy.retire(2)
    assert retired.live_versions() == [1, 3]
    assert AppPolicy.from_dict(retired.to_dict()) == retired
    assert retired.retire(1).retired_versions == (1, 2)


@pytest.mark.parametrize(
    "version, message",
    [
        (3, "current one and cannot be retired"),
        (4, "does not exist"),
        (0, "does not exist"),
        (1, "already retired"),
    ],
)
def test_retire_refusals(version: int, message: str) -> None:
    policy = sim_policy(APP_A, COMPOSE_A, key_version=3, retired_versions=(1,))
    with pytest.raises(UsageError, match=message):
        policy.retire(version)


@pytest.mark.parametrize(
    "retired, message",
    [
        ("1", "list of integers"),
        ([True], "list of integers"),
        ([1.0], "list of integers"),
        ([1, 1], "sorted and distinct"),
        ([3], "older than the current"),
        ([0], "older than the current"),
    ],
)
def test_stored_retired_versions_are_parsed_strictly(retired: Any, message: str) -> None:
    doc = {**sim_policy(APP_A, COMPOSE_A, key_version=3).to_dict(), "retired_versions": retired}
    with pytest.raises(UsageError, match=message):
        AppPolicy.from_dict(doc)
