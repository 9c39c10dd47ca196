"""The one table of error codes (service.errors.TABLE) and what is made from it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from service import errors
from service.openapi import openapi_description

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_error_table_is_the_generated_one() -> None:
    """The README's table of error codes is exactly what `python -m
    service.errors` prints from the table, row for row in precedence order."""
    printed = subprocess.run(
        [sys.executable, "-m", "service.errors"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert printed == errors.markdown_table()
    readme = README.read_text()
    start = readme.index("| status | code | when |")
    end = readme.index("\n\n", start)
    assert readme[start:end] == printed


def test_each_class_takes_its_row() -> None:
    """Every class named in the table answers with its row's code, status,
    title, SQLSTATE and default detail; codes and SQLSTATEs are unique."""
    assert [row.cls for row in errors.TABLE] == list(errors.ERRORS)
    for row in errors.TABLE:
        err = row.cls()
        assert (err.code, err.status, err.title, err.detail) == (
            row.code,
            row.status,
            row.title,
            row.detail.strip(),
        )
        assert row.cls.sqlstate == row.sqlstate
        assert errors.BY_CODE[row.code] is row.cls
    assert len(errors.BY_CODE) == len(errors.TABLE)
    states = [row.sqlstate for row in errors.TABLE if row.sqlstate]
    assert sorted(errors.BY_SQLSTATE) == sorted(states)
    assert errors.InsufficientCredits.code == "insufficient_credits"
    assert errors.InsufficientCredits().problem()["status"] == 409


def test_a_sqlstate_becomes_its_class() -> None:
    """A database error raised with a table row's SQLSTATE translates to that
    row's class, with the hint's JSON as extras."""
    exc = asyncpg.PostgresError.new(
        {"C": "TLB01", "M": "insufficient", "D": "no credits", "H": '{"available": 3}'}
    )
    err = errors.translate(exc)
    assert isinstance(err, errors.InsufficientCredits)
    assert (err.detail, err.extra) == ("no credits", {"available": 3})


def test_openapi_lists_every_code_in_order() -> None:
    """The served description's error table lists the table's codes in its
    order, each with its status and the first line of its detail."""
    description = openapi_description()
    rows = [line for line in description.splitlines() if re.match(r"\| [45]\d\d \|", line)]
    assert [row.split("`")[1] for row in rows] == [row.code for row in errors.TABLE]
    assert rows[0] == (
        "| 400 | `invalid_request` | The request is malformed; see `errors` for the offending "
        "fields. |"
    )


def test_invalid_names_the_path() -> None:
    """invalid() is the 400 for one field: the message under its path, and
    the message (or the detail given) as the problem's detail."""
    err = errors.invalid("$.amount", "must be positive")
    assert err.detail == "must be positive"
    assert err.extra == {"errors": [{"path": "$.amount", "message": "must be positive"}]}
    assert errors.invalid("to", "is wrong", "to is wrong").detail == "to is wrong"
    with pytest.raises(errors.InvalidRequest):
        raise errors.invalid("$", "no")
