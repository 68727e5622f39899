"""Offline verification and repair of a sealfs volume (``sealfs check``, docs/check.md).

Layers: :mod:`.meta` (header, checkpoint, journal, anchor), :mod:`.walk` (records, paths,
link counts), :mod:`.verify` (every data object, in parallel), :mod:`.probe` (swapped versus
rolled back versus tampered), :mod:`.run` (one check end to end), :mod:`.repair` (quarantine
and heal through a normal commit), :mod:`.report` (output).
"""

from .report import KINDS, Finding, Report
from .run import CheckOptions, CheckResult, check_volume, open_and_check

__all__ = [
    "KINDS",
    "CheckOptions",
    "CheckResult",
    "Finding",
    "Report",
    "check_volume",
    "open_and_check",
]
