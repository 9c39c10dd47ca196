"""Two versions of the service side by side, under load in turns.

    python -m bench.side_by_side --database-url DSN --a DIR --b DIR
        [--kind read|debit|path] [--path /healthz] [--rounds 10] [--seconds 2]
        [--connections 16] [--wallets 100] [--a-env NAME=VALUE] [--b-env NAME=VALUE]

On this shared 2-core machine a run's throughput moves by ±15 % with the
other tenants' load, and so does the CPU per request: two versions measured
one after the other, even alternating, can swap places from one pair of
runs to the next. Here both run at once (`python -m service` from each
source tree, one worker each, on the same database) and wrk loads them in
turns of `--seconds`, A then B, then B then A, for `--rounds`: whatever the
machine does, it does to both within seconds. For each version: requests,
requests per second while loaded, and per request the CPU-seconds of its
process tree and of its PostgreSQL backends (the server's processes whose
client is one of its connections: the server must run on this machine),
read from /proc before and after each turn. The server's shared processes
(WAL writer, checkpointer, autovacuum) are counted for neither.

`--kind read` (the default) and `debit` are the bench's wrk phases
(bench/wrk.py: balance reads, or debits of one credit with a fresh
Idempotency-Key each) over `--wallets` employees the tool makes and funds
(idempotently) before the turns, with the bootstrap admin key; `path` GETs
`--path`. Every answer must be 2xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from bench import cpu, wrk
from bench.process import free_port, new_admin_key, service_auth_env

PREFIX = "bench-ab-"


@dataclass
class Side:
    name: str
    tree: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    requests: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    pg_cpu: float = 0.0
    pg_seen: bool = False
    turns: list[float] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def start(self, dsn: str, admin_key: str) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            **service_auth_env(admin_key),
            "DATABASE_URL": dsn,
            "TOKENLEDGER_DATABASE_URL": dsn,
            "TOKENLEDGER_HOST": "127.0.0.1",
            "TOKENLEDGER_PORT": str(self.port),
            "TOKENLEDGER_WORKERS": "1",
            "TOKENLEDGER_LOG_LEVEL": "warning",
            "TOKENLEDGER_SWEEPER_ENABLED": "false",
            **self.env,
        }
        self.proc = subprocess.Popen(  # noqa: S603  # why: our own interpreter and module
            [sys.executable, "-m", "service"],
            cwd=self.tree,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def cpu_seconds(self) -> float:
        """Its process tree's CPU so far (bench/cpu.py: exited workers too)."""
        assert self.proc is not None
        return cpu.tree_cpu_seconds(self.proc.pid) or 0.0

    def backends(self, pg_port: int) -> set[int]:
        """This side's PostgreSQL backends: the server processes whose client
        is one of this side's connections to the server's port."""
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        ports = set()
        for p in [root, *root.children(recursive=True)]:
            try:
                for c in p.net_connections(kind="tcp"):
                    if c.raddr and c.raddr.port == pg_port and c.laddr:
                        ports.add(c.laddr.port)
            except psutil.Error:
                pass
        return {
            c.pid
            for c in psutil.net_connections(kind="tcp")
            if c.laddr
            and c.laddr.port == pg_port
            and c.raddr
            and c.raddr.port in ports
            and c.pid
            # (Not a proxy in front of a server elsewhere.)
            and (cpu.comm(c.pid) or "").startswith("postgres")
        }

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def cpu_of(pids: set[int]) -> dict[int, float]:
    """Each live process's own CPU so far (bench/cpu.py), by pid."""
    out = {}
    for pid in pids:
        stat = cpu.read_stat(pid)
        if stat is not None:
            out[pid] = stat[1]
    return out


def wait_ready(side: Side, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert side.proc is not None
        if side.proc.poll() is not None:
            raise SystemExit(f"{side.name}: the service exited with {side.proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{side.port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{side.name}: not ready within {within} s")


def fund(port: int, admin_key: str, wallets: int) -> None:
    """The wallets the read and debit phases use (idempotent)."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as c:
        calls: list[tuple[str, str, dict[str, object]]] = [
            ("PUT", "/v1/departments/bench-ab", {"name": "bench-ab"})
        ]
        for k in range(wallets):
            emp = f"{PREFIX}{k}"
            calls.append(
                (
                    "PUT",
                    f"/v1/employees/{emp}",
                    {"name": emp, "email": f"{emp}@example.com", "department": "bench-ab"},
                )
            )
        for method, url, body in calls:
            r = c.request(method, url, json=body)
            if r.status_code >= 300:
                raise SystemExit(f"{method} {url}: {r.status_code} {r.text}")
        grants = [
            {
                "key": f"{PREFIX}{k}",
                "employee": f"{PREFIX}{k}",
                "amount": 10**9,
                "reason": "spot_bonus",
            }
            for k in range(wallets)
        ]
        r = c.post("/v1/grants:batch", json={"grants": grants})
        if r.status_code >= 300:
            raise SystemExit(f"POST /v1/grants:batch: {r.status_code} {r.text}")


def turn(side: Side, opts: argparse.Namespace, admin_key: str, run_id: str) -> None:
    if wrk.find() is None:
        raise SystemExit("bench.side_by_side needs wrk (make bench installs it)")
    before = side.cpu_seconds()
    pg_before = cpu_of(side.backends(opts.pg_port))
    side.pg_seen = side.pg_seen or bool(pg_before)
    started = time.monotonic()
    if opts.kind == "path":
        out = subprocess.run(  # noqa: S603  # why: wrk with our own arguments
            [
                str(wrk.find()),
                "-t1",
                f"-c{opts.connections}",
                f"-d{opts.seconds}s",
                "-H",
                f"Authorization: Bearer {admin_key}",
                f"http://127.0.0.1:{side.port}{opts.path}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found = re.search(r"(\d+) requests in", out)
        if found is None or "Non-2xx" in out:
            raise SystemExit(f"{side.name}: wrk did not get only 2xx answers:\n{out}")
        n = int(found.group(1))
    else:
        phase = asyncio.run(
            wrk.run(
                f"http://127.0.0.1:{side.port}",
                admin_key,
                kind=opts.kind,
                wallet_prefix=PREFIX,
                wallets=opts.wallets,
                seconds=opts.seconds,
                run_id=run_id,
                connections=opts.connections,
                threads=1,
            )
        )
        n = int(phase["requests"])
        bad = {k: v for k, v in phase["statuses"].items() if not 200 <= k < 300}
        if bad or phase["unknown"]:
            raise SystemExit(f"{side.name}: answers other than 2xx: {phase}")
    elapsed = time.monotonic() - started
    side.cpu += side.cpu_seconds() - before
    # Backends that served the turn (the pool may have grown during it): what
    # each used since the turn began, or since it started.
    pg_after = cpu_of(side.backends(opts.pg_port) | set(pg_before))
    side.pg_cpu += sum(used - pg_before.get(pid, 0.0) for pid, used in pg_after.items())
    side.requests += n
    side.seconds += elapsed
    side.turns.append(n / elapsed)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--a", type=Path, required=True, help="source tree of version A")
    parser.add_argument("--b", type=Path, required=True, help="source tree of version B")
    parser.add_argument("--kind", choices=("read", "debit", "path"), default="read")
    parser.add_argument("--path", default="/healthz", help="what --kind path GETs")
    parser.add_argument("--wallets", type=int, default=100)
    parser.add_argument(
        "--a-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for side A only (repeatable): compare configurations of one tree",
    )
    parser.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=2, help="seconds of each turn (whole)")
    parser.add_argument("--connections", type=int, default=16)
    opts = parser.parse_args(argv)
    opts.pg_port = urlsplit(opts.database_url).port or 5432
    admin_key = new_admin_key()
    sides = [
        Side("A", opts.a.resolve(), env=dict(x.split("=", 1) for x in opts.a_env)),
        Side("B", opts.b.resolve(), env=dict(x.split("=", 1) for x in opts.b_env)),
    ]
    try:
        for side in sides:
            side.start(opts.database_url, admin_key)
        for side in sides:
            wait_ready(side)
        fund(sides[0].port, admin_key, opts.wallets)
        stamp = int(time.time())
        for r in range(opts.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                turn(side, opts, admin_key, f"ab-{stamp}-{side.name}-{r}")
    finally:
        for side in sides:
            side.stop()
    result: dict[str, object] = {}
    for side in sides:
        per_request_us = side.cpu / side.requests * 1e6 if side.requests else float("nan")
        pg_us = side.pg_cpu / side.requests * 1e6 if side.requests and side.pg_seen else None
        result[side.name] = {
            "tree": str(side.tree),
            "env": side.env,
            "requests": side.requests,
            "requests_per_s": round(side.requests / side.seconds, 1) if side.seconds else None,
            "service_cpu_us_per_request": round(per_request_us, 1),
            "postgres_backend_cpu_us_per_request": None if pg_us is None else round(pg_us, 1),
            "requests_per_s_by_turn": [round(x, 1) for x in side.turns],
        }
        print(
            f"{side.name} ({side.tree}): {side.requests} requests, "
            f"{side.requests / side.seconds:.0f}/s, "
            f"{per_request_us:.1f} us of service CPU and "
            f"{'n/a' if pg_us is None else f'{pg_us:.1f}'} us of its PostgreSQL backends' "
            "per request"
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
