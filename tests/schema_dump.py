"""`pg_dump --schema-only`, normalised and split per object, to compare a
migrated database with a fresh install and say by name what differs.

Normalised away: comments other than pg_dump's object headers, SET lines,
blank lines, `\\restrict` tokens, and the order of a table's columns and
constraints (ALTER TABLE ADD COLUMN appends, so a column added by a
migration is last in an upgraded table and in its place in a fresh one;
the order is physical and no query depends on it).
"""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess

from tests.pg import find_pg_bindir

_HEADER = re.compile(r"^-- Name: (?P<name>.*?); Type: (?P<type>.*?); Schema: .*$")


def pg_dump_path() -> str:
    """pg_dump of the server's major version (a newer one also reads older
    servers; an older one refuses newer servers)."""
    bindir = find_pg_bindir()
    if bindir is not None and (bindir / "pg_dump").exists():
        return str(bindir / "pg_dump")
    found = shutil.which("pg_dump")
    if found is None:
        raise RuntimeError("pg_dump is not installed (Debian: postgresql-client)")
    return found


def schema_objects(dsn: str) -> dict[str, str]:
    """{"TYPE name": normalised definition} of every object in the database."""
    # why S603: a fixed tool with a DSN the tests built themselves.
    out = subprocess.run(  # noqa: S603
        [pg_dump_path(), "--schema-only", "--no-owner", dsn],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    objects: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        header = _HEADER.match(line)
        if header:
            current = objects.setdefault(f"{header['type']} {header['name']}", [])
            continue
        if current is None or not line.strip() or line.startswith("--"):
            continue
        if line.startswith(("SET ", "SELECT pg_catalog.set_config", "\\restrict", "\\unrestrict")):
            continue
        current.append(line.rstrip())
    return {key: "\n".join(_normalise(lines)) for key, lines in objects.items()}


def _normalise(lines: list[str]) -> list[str]:
    """A CREATE TABLE's column and constraint lines sorted, commas dropped."""
    if not lines or not lines[0].startswith("CREATE TABLE"):
        return lines
    try:
        end = lines.index(")", 1)
    except ValueError:
        end = next(i for i, line in enumerate(lines) if line.startswith(")"))
    body = sorted(line.rstrip(",") for line in lines[1:end])
    return [lines[0], *body, *lines[end:]]


def differences(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """What a reader needs to write the missing migration: each object only
    in one of the two, and a unified diff of each that differs."""
    report: list[str] = []
    for key in sorted(expected.keys() - actual.keys()):
        report.append(f"missing after migrating (in a fresh install): {key}\n{expected[key]}")
    for key in sorted(actual.keys() - expected.keys()):
        report.append(f"left over after migrating (not in a fresh install): {key}\n{actual[key]}")
    for key in sorted(expected.keys() & actual.keys()):
        if expected[key] != actual[key]:
            diff = difflib.unified_diff(
                expected[key].splitlines(),
                actual[key].splitlines(),
                "fresh install",
                "migrated",
                lineterm="",
            )
            report.append(f"differs: {key}\n" + "\n".join(diff))
    return report
