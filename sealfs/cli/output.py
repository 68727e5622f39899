"""Error reporting (one line, or JSON) and result printing shared by every command."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from sealfs.errors import SealfsError

from .exit_codes import INTERNAL_ERROR, INTERRUPTED, exit_code

log = logging.getLogger("sealfs")


class SealfsGroup(click.Group):
    """A click group that turns SealfsError into a one-line message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SealfsError as e:
            if _wants_json(ctx):
                click.echo(json.dumps({"ok": False, "error": e.kind, "message": e.message}))
            else:
                click.echo(f"sealfs: error: {e.message}", err=True)
            ctx.exit(exit_code(e))
        except KeyboardInterrupt:
            click.echo("sealfs: interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # a bug: say so in one line unless asked for the traceback
            if os.environ.get("SEALFS_DEBUG"):
                raise
            click.echo(
                f"sealfs: internal error: {type(e).__name__}: {e} "
                "(run with SEALFS_DEBUG=1 for a traceback)",
                err=True,
            )
            ctx.exit(INTERNAL_ERROR)


def _wants_json(ctx: click.Context) -> bool:
    node: click.Context | None = ctx
    while node is not None:
        if node.params.get("as_json"):
            return True
        node = node.parent
    return "--json" in sys.argv[1:]


def emit(data: dict[str, Any], as_json: bool, human: str) -> None:
    """Print ``data`` as one JSON object, or ``human`` text for people."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(human)


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout."
)
