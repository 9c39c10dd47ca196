"""CPU-seconds of whole process trees, from Linux /proc.

Throughput moves a lot on a shared 2-core machine; the CPU an operation
costs moves much less, so the bench reports CPU-seconds per operation. A
single pid is not enough for either side: the service may run several
worker processes, and PostgreSQL does work outside the backends a client
talks to (the WAL writer flushing commits, the checkpointer, autovacuum),
and pgbench's backends exit before they can be sampled. So a tree is
counted whole: every live process under the root, plus the CPU of the
children each of them has already reaped (Linux adds a reaped child's
utime+stime, and its own reaped children's, to the parent's cutime+cstime).
A process that exits between two snapshots thus still counts, through its
parent, and nothing counts twice.

Everything here answers None where /proc is missing or the pid is not a
local process (a server in a container has pids of its own namespace).
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PROC = Path("/proc")


def read_stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own utime+stime, reaped children's cutime+cstime) of a process,
    in seconds; None if it is gone or unreadable."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    fields = raw.rsplit(")", 1)[1].split()
    ppid = int(fields[1])
    own = (int(fields[11]) + int(fields[12])) / TICK
    reaped = (int(fields[13]) + int(fields[14])) / TICK
    return ppid, own, reaped


def process_table() -> dict[int, tuple[int, float, float]]:
    """read_stat of every process visible now, by pid."""
    table: dict[int, tuple[int, float, float]] = {}
    try:
        entries = list(PROC.iterdir())
    except OSError:
        return table
    for entry in entries:
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def tree_pids(root: int, table: dict[int, tuple[int, float, float]]) -> list[int]:
    """root and all its descendants in `table` (root first)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(
    root: int | None, table: dict[int, tuple[int, float, float]] | None = None
) -> float | None:
    """CPU-seconds so far of root's whole tree, exited descendants included
    (see the module docstring); None if root is not a visible process."""
    if root is None:
        return None
    table = process_table() if table is None else table
    if root not in table:
        return None
    return sum(table[pid][1] + table[pid][2] for pid in tree_pids(root, table))


def comm(pid: int) -> str | None:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return None


def local_postmaster(backend_pid: int) -> int | None:
    """The postmaster of a backend pid that PostgreSQL reported
    (pg_backend_pid()), if that backend is a local process: its parent must
    be a `postgres` process too, else the pid belongs to another namespace."""
    stat = read_stat(backend_pid)
    if stat is None or not (comm(backend_pid) or "").startswith("postgres"):
        return None
    ppid = stat[0]
    return ppid if comm(ppid) in ("postgres", "postmaster") else None


def filesystem_of(path: str) -> str | None:
    """The type of the filesystem holding `path` (the longest mount point
    that is a prefix of it, from /proc/mounts): tmpfs makes fsync free."""
    try:
        mounts = (PROC / "mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, parts[2]
    return kind
