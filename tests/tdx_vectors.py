"""Where the real Intel TDX quotes and collateral are (tests/data/tdx/README.md: origin,
licence, expected results). They are part of the repository, so no DCAP test ever skips."""

from __future__ import annotations

from pathlib import Path

TDX_VECTORS = Path(__file__).resolve().parent / "data" / "tdx"
