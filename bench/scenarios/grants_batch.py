"""One POST /v1/grants:batch of 1,000 grants: atomic, and idempotent item by item."""

from __future__ import annotations

from collections import Counter
from typing import Any

from bench.driver import Context, run_workers, send
from bench.stats import Stats

GRANTS_BATCH_MAX = 1000  # the API's limit on items per POST /v1/grants:batch
GRANTS_BATCH_RESEND = 100  # items of the batch sent again, which must answer duplicate


async def grants_batch(ctx: Context) -> Stats:
    """One POST /v1/grants:batch of 1,000 1-credit grants (--requests, at
    most 1,000; not scaled) to one wallet, each item with its own key: its latency, and
    whether it succeeded. A 503 (the statement timeout) is recorded as a
    rejection, not an error: it is the issue's known failure, and the check
    is that it was atomic (nothing granted). After a success, the first
    items again must answer duplicate and grant nothing."""
    name = "grants_batch_1000"
    # Not times --scale: the target is about a batch of 1,000 (as --batch-size
    # is not scaled either); --requests still sets it, for the smoke test.
    n = min(GRANTS_BATCH_MAX, ctx.opts.requests or GRANTS_BATCH_MAX)
    stats = Stats(name, 1, n, 90 * ctx.opts.time_cap_scale, 200, frozenset({503}), op_unit="grant")
    stats.ops_done = 0
    emp = "grants-batch"
    address = f"employee:{emp}"
    await ctx.api.employees([emp])
    items = [
        {"employee": emp, "amount": 1, "reason": "adjustment", "key": f"{ctx.run_id}-{name}-{k}"}
        for k in range(n)
    ]
    answers: Counter[str] = Counter()

    async def step(w: int, i: int) -> None:
        r = await send(ctx, stats, ("POST", "/v1/grants:batch", {"grants": items}, None))
        if r is None or r.status_code != 200:
            return
        for res in r.json().get("results") or []:
            answers[str(res.get("status"))] += 1
        stats.ops_done = answers["created"]

    await run_workers(ctx, stats, [1], step)
    posted = await ctx.api.posted(address)
    succeeded = stats.statuses[200] == 1 and answers["created"] == n
    check: dict[str, Any] = {
        "grants": n,
        "succeeded": succeeded,
        "status": next(iter(stats.statuses), None),
        "answers": dict(answers),
        "posted": posted,
    }
    if stats.transport:
        check.update(passed=True, skipped="a transport error left the outcome unknown")
    elif succeeded:
        again = items[:GRANTS_BATCH_RESEND]
        r = await ctx.client.post("/v1/grants:batch", json={"grants": again})
        results = (r.json().get("results") or []) if r.status_code == 200 else []
        duplicates = sum(1 for res in results if res.get("status") == "duplicate")
        posted_after = await ctx.api.posted(address)
        check["second_send"] = {
            "status": r.status_code,
            "duplicates": duplicates,
            "posted_change": posted_after - posted,
        }
        check["passed"] = posted == n and duplicates == len(again) and posted_after == posted
    else:
        # Nothing or everything: a batch is one database transaction.
        check["passed"] = stats.server_errors == stats.statuses[503] and posted == 0
    stats.check = check
    return stats
