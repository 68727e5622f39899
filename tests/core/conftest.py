"""The ``fs`` fixture: a new volume's filesystem core, loaded, for in-process trio tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sealfs.fs.core import Filesystem
from tests.core.harness import loaded


@pytest.fixture
async def fs(tmp_path: Path) -> AsyncIterator[Filesystem]:
    """A new volume in ``tmp_path / "b"``, loaded writable; closed (committed) after the test,
    so a test that reopens the volume must use :func:`tests.core.harness.loaded` instead."""
    async with loaded(tmp_path / "b") as core:
        yield core
