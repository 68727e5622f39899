"""The logging set-up of every sealfs command, in one place.

The library logs through ``logging.getLogger("sealfs.…")`` and never configures logging; a
command chooses one of two set-ups here. A service (the mount daemon, the KMS server) keeps a
timestamped log of everything at its level, because it runs unattended and its log is what an
operator reads afterwards. A one-shot command shows only the library's warnings (an unpinned
KMS identity, say), each as one ``sealfs: warning:`` line like the CLI's own errors.
"""

from __future__ import annotations

import logging
from typing import TextIO

import click

SERVICE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_service(stream: TextIO, level: int | str) -> None:
    """Log every record at ``level`` (a number or a name such as "INFO") or above, timestamped
    and named, to ``stream``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(SERVICE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)  # one line per request otherwise


def log_warnings() -> None:
    """Show sealfs's warnings on standard error as ``sealfs: warning: …`` (idempotent)."""
    logger = logging.getLogger("sealfs")
    if not any(isinstance(h, _ClickStderr) for h in logger.handlers):
        handler = _ClickStderr(logging.WARNING)
        handler.setFormatter(logging.Formatter("sealfs: warning: %(message)s"))
        logger.addHandler(handler)


class _ClickStderr(logging.Handler):
    """Writes to whatever stderr is current (click's, under a test runner)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)
