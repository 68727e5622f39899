"""The exit-code table: one code per error kind, the one `sealfs --help` documents."""

from __future__ import annotations

import inspect
import re

import pytest
from click.testing import CliRunner

from sealfs import errors
from sealfs.attest.dcap import VerificationFailed
from sealfs.cli import main
from sealfs.cli.exit_codes import EXIT_CODES, exit_code
from sealfs.volume.anchor import RollbackError


def _error_types() -> list[type[errors.SealfsError]]:
    return [
        t
        for _, t in inspect.getmembers(errors, inspect.isclass)
        if issubclass(t, errors.SealfsError)
    ]


def test_every_error_kind_has_its_own_code() -> None:
    assert set(_error_types()) == set(EXIT_CODES)
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)
    assert 0 not in EXIT_CODES.values()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.UsageError("x"), 2),
        (RollbackError("forked", "x"), 5),  # a subclass takes its ancestor's code
        (errors.LuksError, 10),
        (VerificationFailed, 9),
        (type("Unlisted", (errors.SealfsError,), {})("x"), 1),
    ],
)
def test_code_of_an_error_or_its_type(
    error: errors.SealfsError | type[errors.SealfsError], code: int
) -> None:
    assert exit_code(error) == code


def test_help_lists_the_table() -> None:
    """`sealfs --help` names exactly the codes of the table (and 0)."""
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    listed = re.search(r"Exit codes:(.*?)\.\s*$", res.output, re.S)
    assert listed is not None, res.output
    codes = {int(n) for n in re.findall(r"\b(\d+)\s+[a-zA-Z]", listed.group(1))}
    assert codes == {0, *EXIT_CODES.values()}
