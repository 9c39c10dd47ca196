"""The throughput phases with wrk (bench/wrk.py): debits, then balance reads."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.driver import Context, wallet_postings
from bench.stats import cpu_ms_per_op

WRK_FUNDING = 100_000  # credits per wallet of the wrk phases: far more than they can debit


async def wrk_phases(ctx: Context, base_url: str, token: str) -> dict[str, Any]:
    """The throughput phases (bench/wrk.py): debits, then balance reads, each
    for --wrk-seconds at 32 connections over --wallets wallets of their own.
    Checked in aggregate: every answer the expected 2xx, and the wallets'
    balances fell by exactly the debits the server made, which are at least
    the 201s wrk saw and at most those plus the requests in flight when it
    stopped (one per connection)."""
    from bench import wrk

    if wrk.find() is None:
        return {"available": False, "error": "wrk not found (make bench installs it)"}
    n = ctx.wallets()
    prefix = "wrk-spread-"
    wallets = [f"{prefix}{k}" for k in range(n)]
    await ctx.api.employees(wallets)
    await ctx.api.grants({w: WRK_FUNDING for w in wallets})
    out: dict[str, Any] = {"available": True, "wallets": n, "phases": {}}
    for kind, ok_status in (("debit", 201), ("read", 200)):
        before_posted = sum(await wallet_postings(ctx, wallets)) if kind == "debit" else 0
        before = await ctx.probe.snapshot() if ctx.probe else None
        phase = await wrk.run(
            base_url,
            token,
            kind=kind,
            wallet_prefix=prefix,
            wallets=n,
            seconds=ctx.opts.wrk_seconds,
            run_id=f"{ctx.run_id}-wrk",
        )
        if ctx.probe and before:
            phase["cpu"] = ctx.probe.delta(before, await ctx.probe.snapshot())
        ok = phase["statuses"].get(ok_status, 0)
        phase["ok"] = ok
        phase["ops_per_s"] = round(ok / phase["seconds"], 1) if phase["seconds"] else None
        phase.update(cpu_ms_per_op(phase.get("cpu"), ok))
        others = {k: v for k, v in phase["statuses"].items() if k != ok_status}
        check: dict[str, Any] = {"other_statuses": others, "socket_errors": phase["unknown"]}
        if kind == "debit":
            # wrk stops with requests in flight; the server may still commit them after
            # wrk has exited (a coalesced batch in progress). Read the wallets until two
            # reads 100 ms apart agree, so the system:usage check compares like with like.
            postings = sum(await wallet_postings(ctx, wallets))
            for _ in range(50):
                await asyncio.sleep(0.1)
                again = sum(await wallet_postings(ctx, wallets))
                if again == postings:
                    break
                postings = again
            debited = before_posted - postings
            in_flight = phase["connections"] + phase["unknown"]
            check.update({"debits_answered_201": ok, "debited_by_server": debited})
            check["passed"] = not others and ok <= debited <= ok + in_flight
            # The system:usage check counts what the server debited.
            ctx.debited["wrk_debit"] = debited
        else:
            check["passed"] = not others and phase["unknown"] == 0
        phase["check"] = check
        out["phases"][kind] = phase
    return out
