"""The LiteLLM hook's added latency per call: reserve (with token counting)
before the model, capture after it, against a running tokenledger.

    python -m bench.gateway_overhead [--calls N] [--concurrency C] [--json PATH]
                                     [--url URL --api-key KEY] [--database-url DSN]

Without --url it provisions a database (bench.postgres.provision: DATABASE_URL's
server or a throwaway one from service/devdb.py), starts `python -m service` on it
(one worker) and sets up a department, a price and one funded employee per
concurrent caller. The hook (tokenledger_client.litellm_hook.TokenledgerHook)
then runs its pre-call hook and its success hook for each call exactly as the
proxy runs them, with a model response in between that takes no time; what is
timed is those two hooks, which is what the hook adds to a call. Printed: p50,
p90, p99 and max in milliseconds of the pre-call hook (token counting +
reserve), its token counting alone, the success hook (capture) and their sum.
All traffic goes to 127.0.0.1; the run is bounded by --calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from bench import REPO
from bench.postgres import provision
from bench.process import Service
from bench.stats import percentile

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

PRICE = {"input_per_mtok": 150_000, "cached_input_per_mtok": 75_000, "output_per_mtok": 600_000}
MODEL = "gpt-4o-mini"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant for an engineering team."},
    {"role": "user", "content": "Explain, in three short paragraphs, how a double-entry ledger "
     "keeps every account balanced, and why reservations are captured or released."},
]  # fmt: skip


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def setup(url: str, admin_key: str, employees: int) -> list[str]:
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
        r = await c.put("/v1/departments/gw", json={"name": "Gateway"})
        assert r.status_code in (200, 201), r.text
        r = await c.post(
            "/v1/prices", headers={"Idempotency-Key": f"price-{MODEL}"},
            json={"model": MODEL, "effective_from": "2020-01-01T00:00:00Z", **PRICE},
        )  # fmt: skip
        assert r.status_code in (200, 201), r.text
        ids = []
        for i in range(employees):
            emp = f"gw-bench-{i}-{uuid.uuid4().hex[:6]}"
            body = {"name": emp, "email": f"{emp}@example.com", "department": "gw"}
            r = await c.put(f"/v1/employees/{emp}", json=body)
            assert r.status_code in (200, 201), r.text
            r = await c.post(
                "/v1/grants", headers={"Idempotency-Key": f"grant-{emp}"},
                json={"employee": emp, "amount": 10**12, "reason": "spot_bonus"},
            )  # fmt: skip
            assert r.status_code == 201, r.text
            ids.append(emp)
        return ids


def meter_key(dsn: str) -> str:
    out = subprocess.run(  # noqa: S603  # why: our own interpreter and module
        [sys.executable, "-m", "service", "keys", "create", "--name", "gw-bench",
         "--role", "meter"],
        cwd=REPO, env={**os.environ, "DATABASE_URL": dsn, "TOKENLEDGER_DATABASE_URL": dsn},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def summary(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)

    def ms(q: float) -> float | None:
        v = percentile(ordered, q)
        return None if v is None else round(v * 1000, 2)

    return {"p50_ms": ms(50), "p90_ms": ms(90), "p99_ms": ms(99),
            "max_ms": round(ordered[-1] * 1000, 2) if ordered else None}  # fmt: skip


async def measure(
    url: str, api_key: str, employees: list[str], calls: int, warmup: int = 20
) -> dict[str, Any]:
    """Run `calls` calls through the hook, `len(employees)` at a time; timings."""
    import litellm
    from litellm.types.utils import PromptTokensDetailsWrapper

    from tokenledger_client.litellm_hook import HookConfig, TokenledgerHook

    hook = TokenledgerHook(HookConfig(url=url, api_key=api_key, model_aliases={"chat": MODEL}))
    user = SimpleNamespace(user_id=None, user_email=None)
    timings: dict[str, list[float]] = {"pre_call": [], "count_tokens": [], "capture": [],
                                       "total": []}  # fmt: skip

    async def one(emp: str, record: bool) -> None:
        data = {"model": "chat", "messages": list(MESSAGES), "user": emp, "max_tokens": 500,
                "litellm_call_id": str(uuid.uuid4())}  # fmt: skip
        t0 = time.perf_counter()
        hook.count_input_tokens(data)
        t1 = time.perf_counter()
        data = await hook.async_pre_call_hook(user, None, data, "acompletion")
        t2 = time.perf_counter()
        response = litellm.ModelResponse(usage=litellm.Usage(
            prompt_tokens=60, completion_tokens=180, total_tokens=240,
            prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=32)))  # fmt: skip
        t3 = time.perf_counter()
        await hook.async_post_call_success_hook(data, user, response)
        t4 = time.perf_counter()
        await hook.async_post_call_response_headers_hook(data, user, response)
        if record:
            timings["count_tokens"].append(t1 - t0)
            timings["pre_call"].append(t2 - t1)
            timings["capture"].append(t4 - t3)
            timings["total"].append((t2 - t1) + (t4 - t3))

    async def worker(emp: str, n: int, record: bool) -> None:
        for _ in range(n):
            await one(emp, record)

    try:
        await asyncio.gather(*[worker(e, max(1, warmup // len(employees)), False)
                               for e in employees])  # fmt: skip
        per = [calls // len(employees) + (1 if i < calls % len(employees) else 0)
               for i in range(len(employees))]  # fmt: skip
        started = time.perf_counter()
        await asyncio.gather(*[worker(e, n, True) for e, n in zip(employees, per, strict=True)])
        wall = time.perf_counter() - started
    finally:
        await hook.aclose()
    return {
        "calls": len(timings["total"]),
        "concurrency": len(employees),
        "calls_per_second": round(len(timings["total"]) / wall, 1),
        **{name: summary(values) for name, values in timings.items()},
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.url:
        return await measure(args.url, args.api_key, args.employee or [], args.calls)
    database = await provision(args.database_url, f"tokenledger_gw_{os.getpid()}")
    service = None
    try:
        await database.apply_schema()
        log_path = Path(tempfile.mkdtemp(prefix="bench-gateway-")) / "service.log"
        service = Service(database.dsn, log_path, extra_env={"TOKENLEDGER_WORKERS": "1"})
        service.start()
        await service.wait_ready()
        employees = await setup(service.base_url, service.admin_key, args.concurrency)
        key = await asyncio.to_thread(meter_key, database.dsn)
        result = await measure(service.base_url, key, employees, args.calls)
        result["database"] = database.source
        return result
    finally:
        if service is not None:
            service.stop()
        await database.drop()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--url", help="a running tokenledger (with --api-key, a meter key)")
    p.add_argument("--api-key")
    p.add_argument("--employee", action="append", help="funded employee ids (with --url)")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = p.parse_args(argv)
    if args.url and not (args.api_key and args.employee):
        p.error("--url needs --api-key and at least one --employee")
    if not 1 <= args.calls <= 100_000 or not 1 <= args.concurrency <= 64:
        p.error("--calls 1..100000, --concurrency 1..64")
    return args


if __name__ == "__main__":
    arguments = parse()
    outcome = asyncio.run(main(arguments))
    print(f"hook overhead, {outcome['calls']} calls, concurrency {outcome['concurrency']} "
          f"({outcome['calls_per_second']} calls/s):")  # fmt: skip
    for part in ("count_tokens", "pre_call", "capture", "total"):
        s = outcome[part]
        print(f"  {part:13} p50 {s['p50_ms']:7.2f} ms  p90 {s['p90_ms']:7.2f} ms  "
              f"p99 {s['p99_ms']:7.2f} ms  max {s['max_ms']:7.2f} ms")  # fmt: skip
    if arguments.json:
        arguments.json.write_text(json.dumps(outcome, indent=2))
