"""wrk as the load generator of the throughput phases (`--wrk-seconds`).

The issue-10 figures were measured with wrk at 32 connections, and pgbench,
the reference, is a C client too: a load generator written in Python spends
CPU that the service and PostgreSQL then do not get on a 2-core machine, and
its own scheduling delays show up as the service's latency. The scenarios
keep their exact request counts and per-request checks with the Python
client; these phases run for a fixed time with wrk and are checked in
aggregate (every answer counted by status, the wallets' balances against the
debits that succeeded).

Each phase is a Lua script: wrk's threads build the requests (a fresh
Idempotency-Key each, wallets spread as the Python scenarios spread them)
and count the answers by status; `done` prints one JSON line with the
counts and wrk's latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Requests, one per kind. `wallet` is the k-th wallet of the phase.
_LUA = r"""
local counter = 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  token = os.getenv("TL_TOKEN")
  prefix = os.getenv("TL_PREFIX")
  wallets = tonumber(os.getenv("TL_WALLETS"))
  run = os.getenv("TL_RUN")
  kind = os.getenv("TL_KIND")
  statuses = {}
end
function request()
  counter = counter + 1
  local w = (counter * 2 + tid) % wallets
  local address = "employee:" .. prefix .. w
  if kind == "debit" then
    return wrk.format("POST", "/v1/debits", {
      ["Authorization"] = "Bearer " .. token,
      ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = run .. "-" .. tid .. "-" .. counter,
    }, '{"account":"' .. address .. '","amount":1}')
  end
  return wrk.format("GET", "/v1/accounts/" .. address, {["Authorization"] = "Bearer " .. token})
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local parts = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do
      parts[status] = (parts[status] or 0) + n
    end
  end
  local s = {}
  for status, n in pairs(parts) do table.insert(s, '"' .. status .. '":' .. n) end
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"statuses":{%s},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, table.concat(s, ","),
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


def find() -> str | None:
    return shutil.which("wrk")


async def run(
    base_url: str,
    token: str,
    *,
    kind: str,
    wallet_prefix: str,
    wallets: int,
    seconds: float,
    run_id: str,
    connections: int = 32,
    threads: int = 2,
) -> dict[str, Any]:
    """One phase: `kind` is "debit" (POST /v1/debits of 1 credit) or "read"
    (GET /v1/accounts/...) over wallets `<prefix>0`..`<prefix>{wallets-1}`.
    Returns wrk's counts and latencies (ms), and `unknown`: requests whose
    outcome wrk did not see (socket errors, timeouts)."""
    exe = find()
    assert exe is not None, "wrk is not installed"
    scratch = tempfile.mkdtemp(prefix="tl-wrk-")
    script = Path(scratch) / "phase.lua"
    try:
        script.write_text(_LUA)  # noqa: ASYNC240  # why: a 2 kB file, once per phase
        proc = await asyncio.create_subprocess_exec(
            exe,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            base_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={
                "TL_TOKEN": token,
                "TL_PREFIX": wallet_prefix,
                "TL_WALLETS": str(wallets),
                "TL_RUN": run_id,
                "TL_KIND": kind,
                "PATH": "/usr/bin:/bin",
            },
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=seconds + 60)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    line = next((x for x in out.decode().splitlines() if x.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk exited {proc.returncode}: {err.decode()[-500:]} {out.decode()[-500:]}"
        )
    raw = json.loads(line)
    seconds_run = raw["duration_us"] / 1e6
    statuses = {int(k): v for k, v in raw["statuses"].items()}
    errors = raw["errors"]
    unknown = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    return {
        "kind": kind,
        "connections": connections,
        "threads": threads,
        "seconds": round(seconds_run, 3),
        "requests": raw["requests"],
        "statuses": statuses,
        "socket_errors": errors,
        "unknown": unknown,
        "req_per_s": round(raw["requests"] / seconds_run, 1) if seconds_run else None,
        "latency_ms": {k: round(v / 1000, 2) for k, v in raw["latency_us"].items()},
    }
