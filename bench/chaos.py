"""Load while the service's database connections are killed; then count.

    python -m bench.chaos [--seconds 30] [--workers 16] [--kill-every 2]
                          [--json PATH] [--database-url DSN] [--seed N]

The service runs as in the benchmark (bench/process.py). For --seconds,
--workers workers send debits, transfers, grants and reservations (reserve,
then capture -- now and then more than held -- or release) against
well-funded wallets while, every --kill-every seconds, a separate connection
runs `pg_terminate_backend` on every connection the service holds
(application_name = 'tokenledger', in the chaos database only).

Rules checked (any violation exits 1):

* every answer is 2xx, 409 or 503, and a 503 carries Retry-After;
* no `insufficient_credits`: the wallets hold far more than the run can spend,
  so one would be a retryable failure reported as a business rejection;
* no 409 at all on a reserve, capture or release (each reservation gets
  exactly one capture or release, so `reservation_not_active` would mean a
  retry was not recognised as one);
* a request answered 503, `idempotency_key_in_progress`, a transport error or
  (after recording the violation) another 5xx is sent again with the SAME
  Idempotency-Key and body until it gets a final answer (bounded); after the
  load stops, the ones still open are settled the same way, and none may stay
  unknown; a reservation is captured or released only once its reserve has a
  final answer (from which it takes the reservation id), and the reservations
  that got theirs only while settling are captured or released then;
* effects equal balances: what system:usage gained equals the successful
  debits plus captures, the wallets' sum moved by grants minus debits minus
  captures, and system:issuance by minus the grants;
* after settling, `reserved` is 0 on every wallet, and every reservation reads
  `captured` (with the amount captured) or `released`, as its answer said;
* the audit passes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import RESULTS_DIR
from bench.api import Api, make_client
from bench.chaos_ops import KINDS, SETTLE_ATTEMPTS, SETTLE_SECONDS, WALLET_FUNDING, Chaos, Tally
from bench.driver import run_async
from bench.faults import killer, wait_ready_again
from bench.postgres import provision, redact
from bench.process import Service, run_audit
from bench.report import git_commit, machine_facts, service_log_lines, write_json

DEFAULT_JSON = RESULTS_DIR / "chaos.json"
READY_AGAIN_SECONDS = 30.0


async def balances(api: Api, wallets: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Posted balances (system accounts, the wallets' sum), and the wallets
    whose `reserved` is not 0."""
    out = {
        "system:usage": await api.posted("system:usage"),
        "system:issuance": await api.posted("system:issuance"),
    }
    accounts = {w: await api.account(f"employee:{w}") for w in wallets}
    out["wallets"] = sum(int(a["posted"]) for a in accounts.values())
    reserved = {w: int(a["reserved"]) for w, a in accounts.items() if int(a["reserved"]) != 0}
    return out, reserved


@dataclass
class ChaosOptions:
    seconds: float = 30.0
    workers: int = 16
    kill_every: float = 2.0
    json_path: Path = DEFAULT_JSON
    database_url: str | None = None
    seed: int = 1


async def run_chaos(opts: ChaosOptions) -> dict[str, Any]:
    run_id = f"c{os.getpid()}-{int(time.time())}"
    tally = Tally()
    result: dict[str, Any] = {
        "tool": "tokenledger chaos",
        "started_at": datetime.now(UTC).isoformat(),
        "git_commit": git_commit(),
        "options": {
            "seconds": opts.seconds,
            "workers": opts.workers,
            "kill_every": opts.kill_every,
            "seed": opts.seed,
        },
        "checks": {},
    }
    db = await provision(opts.database_url, f"tokenledger_chaos_{os.getpid()}")
    result["database"] = {"source": db.source, "dsn": redact(db.dsn)}
    log_path = opts.json_path.with_suffix(".service.log")
    service = Service(db.dsn, log_path)
    result["service_log"] = str(log_path)
    wallets = [f"chaos-{k}" for k in range(2 * opts.workers)]
    try:
        service.start()
        await service.wait_ready()
        async with make_client(service.base_url, opts.workers, service.admin_key) as client:
            api = Api(client, run_id)
            await api.department()
            await api.employees(wallets)
            await api.grants({w: WALLET_FUNDING for w in wallets})
            before, reserved_before = await balances(api, wallets)
            chaos = Chaos(client, wallets, tally, run_id)

            started = time.monotonic()
            deadline = started + opts.seconds
            stop = asyncio.Event()
            kill_task = asyncio.create_task(killer(db.dsn, opts.kill_every, stop, tally))
            try:
                await asyncio.gather(
                    *(chaos.worker(w, deadline, opts.seed) for w in range(opts.workers))
                )
            finally:
                stop.set()
                await kill_task
            result["load_seconds"] = round(time.monotonic() - started, 2)

            open_ops = [op for op in tally.ops if op.final is None]
            result["open_after_load"] = len(open_ops)
            settle_deadline = time.monotonic() + SETTLE_SECONDS
            for op in open_ops:
                left = settle_deadline - time.monotonic()
                if left <= 0:
                    break
                await chaos.settle(op, op.attempts + SETTLE_ATTEMPTS, left)
            # Reservations whose reserve got its final answer only while
            # settling are captured or released now, the same way.
            follow_deadline = time.monotonic() + SETTLE_SECONDS
            for op in [op for op in tally.ops if op.kind == "reserve"]:
                left = follow_deadline - time.monotonic()
                if left <= 0:
                    break
                child = chaos.follow_up(op)
                if child is not None:
                    await chaos.settle(child, SETTLE_ATTEMPTS, left)
            unknown = [op for op in tally.ops if op.final is None]
            unfollowed = [
                op for op in tally.ops if op.kind == "reserve" and op.succeeded and op.child is None
            ]
            for op in unfollowed[:10]:
                tally.violate(f"reserve {op.key}: succeeded, but was never captured or released")
            for op in unknown[:10]:
                tally.violate(f"{op.kind} {op.key}: no final answer after {op.attempts} attempts")
            if len(unknown) > 10:
                tally.violate(f"... {len(unknown)} operations in all without a final answer")

            ready = await wait_ready_again(service, READY_AGAIN_SECONDS)
            result["checks"]["ready_after_chaos"] = {"passed": ready}
            if not ready:
                tally.violate(f"GET /readyz not 200 within {READY_AGAIN_SECONDS:.0f}s after")
            after, reserved_after = await balances(api, wallets)
            reservations = await chaos.check_reservations(tally.ops)

        ok = {kind: [op for op in tally.ops if op.kind == kind and op.succeeded] for kind in KINDS}
        debited = sum(op.amount for op in ok["debit"])
        granted = sum(op.amount for op in ok["grant"])
        captured = sum(op.amount for op in ok["capture"])
        gains = {k: after[k] - before[k] for k in after}
        effects: dict[str, dict[str, Any]] = {
            "system_usage": {"expected_gain": debited + captured, "gain": gains["system:usage"]},
            "system_issuance": {"expected_gain": -granted, "gain": gains["system:issuance"]},
            "wallets": {
                "expected_gain": granted - debited - captured,
                "gain": gains["wallets"],
            },
        }
        for name, check in effects.items():
            check["passed"] = check["gain"] == check["expected_gain"] and not unknown
            if unknown:
                check["note"] = "some operations have no final answer: effects unknown"
            elif not check["passed"]:
                tally.violate(
                    f"effects != balances: {name} gained {check['gain']}, "
                    f"successful operations say {check['expected_gain']}"
                )
            result["checks"][name] = check
        # Holds: none before the load, none left after settling.
        reserved_check: dict[str, Any] = {
            "nonzero_before": dict(list(reserved_before.items())[:10]),
            "nonzero_after": dict(list(reserved_after.items())[:10]),
            "reserved_after": sum(reserved_after.values()),
            "passed": not reserved_before and not reserved_after and not unknown,
        }
        if unknown:
            reserved_check["note"] = "some operations have no final answer: holds unknown"
        elif reserved_before or reserved_after:
            tally.violate(
                f"reserved not 0 on {len(reserved_before)} wallet(s) before the load and "
                f"{len(reserved_after)} after settling: {dict(list(reserved_after.items())[:5])}"
            )
        result["checks"]["wallets_reserved"] = reserved_check
        if unknown:
            reservations["passed"] = False
            reservations["note"] = "some operations have no final answer"
        elif not reservations["passed"]:
            for line in reservations["wrong"]:
                tally.violate(f"reservation {line}")
            if reservations["without_final_capture_or_release"]:
                tally.violate(
                    f"{reservations['without_final_capture_or_release']} reservation(s) "
                    "without a successful capture or release"
                )
        result["checks"]["reservations"] = reservations

        result["operations"] = {
            kind: {
                "sent": sum(1 for op in tally.ops if op.kind == kind),
                "succeeded": len(ok[kind]),
                "succeeded_on_retry": sum(1 for op in ok[kind] if op.attempts > 1),
                "succeeded_by_replay": sum(1 for op in ok[kind] if op.replayed),
                "succeeded_after_5xx": sum(1 for op in ok[kind] if op.server_errors),
                # The effect had happened although the service answered 5xx:
                # the retry got the stored answer back.
                "committed_despite_5xx": sum(
                    1 for op in ok[kind] if op.server_errors and op.replayed
                ),
                "rejected_409": sum(1 for op in tally.ops if op.kind == kind and op.final == 409),
                "unknown": sum(1 for op in unknown if op.kind == kind),
                "credits": sum(op.amount for op in ok[kind]),
            }
            for kind in KINDS
        }
    finally:
        result["service_stop"] = await asyncio.to_thread(service.stop)
        result["service_log_events"] = dict(service.log_events())
        result["service_unhandled_exceptions"] = dict(service.unhandled_exceptions())
        try:
            audit = await asyncio.to_thread(run_audit, db.dsn)
            result["checks"]["audit"] = audit
            if not audit["passed"]:
                tally.violate("audit failed: " + audit["output"][-500:])
            result["machine"] = machine_facts(db)
        finally:
            await db.drop()

    attempts = sum(op.attempts for op in tally.ops)
    result.update(
        {
            "answers": {str(k): v for k, v in sorted(tally.answers.items())},
            "answer_codes": dict(tally.codes),
            "transport_errors": dict(tally.transport),
            "requests": attempts,
            "retries": attempts - len(tally.ops),
            "kills": tally.kills,
            "connections_killed": tally.connections_killed,
            "kill_errors": tally.kill_errors[:10],
            "violations": tally.violations,
            "finished_at": datetime.now(UTC).isoformat(),
        }
    )
    if tally.kills == 0 and opts.seconds >= opts.kill_every:
        tally.violate("the killer never ran: the run proves nothing")
    result["passed"] = not tally.violations
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"chaos: {result['options']['workers']} workers for {result.get('load_seconds', '?')}s, "
        f"connections killed every {result['options']['kill_every']}s",
        f"kills: {result['kills']} rounds, {result['connections_killed']} connections terminated",
        f"requests: {result['requests']} ({result['retries']} retries with the same key)",
        "answers: " + ", ".join(f"{k}={v}" for k, v in result["answers"].items()),
    ]
    if result["answer_codes"]:
        lines.append("codes: " + ", ".join(f"{k}={v}" for k, v in result["answer_codes"].items()))
    if result["transport_errors"]:
        lines.append(
            "transport errors: "
            + ", ".join(f"{k}={v}" for k, v in result["transport_errors"].items())
        )
    lines.append(
        f"{'operation':<10}{'sent':>7}{'ok':>7}{'ok/retry':>9}{'replayed':>9}"
        f"{'ok/5xx':>7}{'5xx+done':>9}{'409':>6}{'unknown':>8}{'credits':>9}"
    )
    for kind, o in result.get("operations", {}).items():
        lines.append(
            f"{kind:<10}{o['sent']:>7}{o['succeeded']:>7}{o['succeeded_on_retry']:>9}"
            f"{o['succeeded_by_replay']:>9}{o['succeeded_after_5xx']:>7}"
            f"{o['committed_despite_5xx']:>9}"
            f"{o['rejected_409']:>6}{o['unknown']:>8}{o['credits']:>9}"
        )
    for name, check in result["checks"].items():
        verdict = "pass" if check.get("passed") else "FAIL"
        detail = ""
        if "gain" in check:
            detail = f" (gain {check['gain']}, expected {check['expected_gain']})"
        elif "reserved_after" in check:
            detail = f" (reserved after settling {check['reserved_after']}, expected 0)"
        elif "reservations" in check:
            detail = (
                f" ({check['reservations']} reservations: {check['captured']} captured, "
                f"{check['released']} released, {len(check['wrong'])} wrong, "
                f"{check['without_final_capture_or_release']} without a final capture/release)"
            )
        lines.append(f"check {name}: {verdict}{detail}")
    lines += service_log_lines(result)
    lines.append(f"service stop: {result.get('service_stop')}")
    shown = 15
    for v in result["violations"][:shown]:
        lines.append(f"VIOLATION {v}")
    if len(result["violations"]) > shown:
        lines.append(f"... {len(result['violations']) - shown} more violations in the JSON")
    lines.append("result: " + ("PASS" if result["passed"] else "FAIL"))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> ChaosOptions:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="load time (default 30)")
    parser.add_argument("--workers", type=int, default=16, help="workers (default 16)")
    parser.add_argument(
        "--kill-every", type=float, default=2.0, help="seconds between connection kills (default 2)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        dest="json_path",
        help="write the JSON result here (default bench/results/chaos.json)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="PostgreSQL server to create the chaos database on "
        "(default DATABASE_URL; unset: a throwaway server)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]")
    if not 2 <= args.workers <= 256:
        parser.error("--workers must be 2..256")
    if not 0.1 <= args.kill_every <= 600:
        parser.error("--kill-every must be 0.1..600")
    return ChaosOptions(
        seconds=args.seconds,
        workers=args.workers,
        kill_every=args.kill_every,
        json_path=args.json_path.resolve(),
        database_url=args.database_url,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    result = run_async(run_chaos(opts))
    write_json(result, opts.json_path)
    print(summary(result))
    print(f"chaos: wrote {opts.json_path}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
