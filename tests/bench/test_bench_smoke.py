"""Smoke runs of the benchmark and the chaos run, at a tiny scale, against the
session's test PostgreSQL: the real service as a subprocess, as `make bench`
and `make chaos` run it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from bench import chaos, harness, pgbench
from bench.scenarios import INTERLEAVED, INTERLEAVED_ROUNDS, POLICY_RATIOS, SCENARIOS
from service.devdb import Server

pytestmark = pytest.mark.slow


BATCH_SCENARIOS = ("usage_batch_500", "usage_batch_500_c16")


def test_bench_smoke(pg_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every scenario completes at 20 requests (20 reserve+capture pairs for the
    reservation scenarios, 20 usage events for the usage scenarios: 20 single
    requests, 2 batches of 10; one grants:batch of 20) and 4 workers with no
    5xx, over 40 spread wallets, after a 2-second pgbench reference and a
    warm-up that records a usage batch per connection; the audit passes, and
    every issue-10 target is reported without deciding the result."""
    out = tmp_path / "bench.json"
    rc = harness.main(
        [
            "--requests",
            "20",
            "--workers",
            "4",
            "--batch-size",
            "10",
            "--wallets",
            "40",
            "--pgbench-seconds",
            "2",
            "--pgbench-scale",
            "1",
            "--database-url",
            pg_server.dsn,
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    report = capsys.readouterr().out.split("\n{", 1)[0]  # the table, not the JSON
    scenarios = {s["name"]: s for s in result["scenarios"]}
    assert list(scenarios) == list(SCENARIOS), report
    for name, s in scenarios.items():
        assert s["setup_error"] is None, (name, s["setup_error"])
        per_op = 2 if s["op"] == "reserve+capture pair" else 1
        requests = 2 if name in BATCH_SCENARIOS else 20 * per_op
        requests = 1 if name == "grants_batch_1000" else requests
        assert s["planned"] == 20 and not s["capped"], (name, report)
        assert s["requests"] == requests and s["ops"] == 20, (name, report)
        for part in ("postgres", "postgres_server", "service"):
            assert f"{part}_cpu_ms_per_op" in s, (name, part)
        assert s["server_errors_5xx"] == 0, (name, s["samples"])
        assert s["errors"] == 0, (name, s["error_codes"], s["samples"])
        assert s["check"] is None or s["check"]["passed"], (name, s["check"])
    assert result["checks"]["audit"]["passed"], result["checks"]["audit"]["output"]
    # The warm-up ran the usage batch path on every connection it held (4 workers).
    warm = result["warm_up"]
    assert warm["usage_batches"] == {"200": 4} and warm["usage_events_recorded"] == 8, warm
    for name in ("reserve_capture_spread_32", "reserve_capture_shared_32"):
        check = scenarios[name]["check"]
        assert "skipped" not in check, (name, check)
        assert check["reservations_created"] == check["captures_ok"] == 20, (name, check)
        assert check["over_captures_ok"] >= 1, (name, check)  # capture 12 of 10 held
        assert check["usage_gain"] == check["captured_sum"] > 0, (name, check)
        assert check["reserved_nonzero"] == {}, (name, check)
    for name in ("usage_single", *BATCH_SCENARIOS):
        check = scenarios[name]["check"]
        assert "skipped" not in check, (name, check)
        assert check["events_sent"] == check["events_recorded"] == 20, (name, check)
        assert check["event_answers"] == {"recorded": 20}, (name, check)
        assert check["usage_gain"] == check["expected_usage_gain"] > 0, (name, check)
        second = check["second_send"]
        assert second["passed"] and second["usage_gain"] == 0, (name, check)
        assert second["answers"] == {"duplicate": second["events"]}, (name, check)
    for name in BATCH_SCENARIOS:
        assert scenarios[name]["check"]["batches"] == 2, name
    grants = scenarios["grants_batch_1000"]["check"]
    assert grants["succeeded"] and grants["posted"] == 20, grants
    assert grants["second_send"]["duplicates"] == 20, grants
    assert scenarios["debit_spread_32"]["check"]["wallets"] == 40
    reference = result["pgbench"]
    if pgbench.find_pgbench()[0] is None:
        assert not reference["available"] and "not found" in reference["error"], reference
    else:
        assert reference["tps"] > 0 and reference["transactions"] > 0, reference
        assert "error" not in reference, reference
    assert len(result["targets"]) == 11, result["targets"]
    if reference.get("tps") and sys.platform.startswith("linux"):
        # Every figure a target needs was measured (met or not does not matter).
        missing = [t["target"] for t in result["targets"] if t["measured"] is None]
        assert missing == [], result["targets"]
    assert all(t["met"] in (True, False, None) for t in result["targets"]), result["targets"]
    assert "target (issue 10)" in report
    assert result["checks"]["system_usage"]["passed"], result["checks"]["system_usage"]
    assert "shared_over_spread" in result["ratios"]
    assert "reserve_capture_shared_over_spread" in result["ratios"]
    assert "usage_batch_over_single" in result["ratios"]
    # The spend-policy pairs ran interleaved, in rounds, and are compared in
    # ops/s and in CPU per op.
    for plain, policy in INTERLEAVED:
        assert scenarios[plain]["rounds"] == scenarios[policy]["rounds"] == INTERLEAVED_ROUNDS
    for key in POLICY_RATIOS:
        assert key in result["ratios"], result["ratios"]
        assert f"{key}_postgres_server_cpu_per_op" in result["ratios"], result["ratios"]
        # Every request of both succeeded, so each round's ratio is known.
        assert result["ratios"][f"{key}_median_of_rounds"] > 0, result["ratios"]
    assert f"(interleaved, {INTERLEAVED_ROUNDS} rounds each)" in report
    assert "median of the rounds' ratios" in report
    assert scenarios["debit_latency"]["rounds"] == 1
    assert rc == 0 and result["passed"], report


PGBENCH_REPORT = """\
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 10
number of clients: 8
number of threads: 2
duration: 15 s
number of transactions actually processed: 69015
number of failed transactions: 0 (0.000%)
latency average = 1.738 ms
initial connection time = 9.147 ms
tps = 4601.152817 (without initial connection time)
"""


def test_pgbench_report_parsed() -> None:
    """The reference's figures come from pgbench's closing report."""
    assert pgbench.parse_output(PGBENCH_REPORT) == {
        "tps": 4601.152817,
        "transactions": 69015,
        "failed": 0,
        "latency_avg_ms": 1.738,
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_tree_cpu_counts_children() -> None:
    """A process tree's CPU includes its live descendants: this test process's
    tree holds at least its own CPU time."""
    from bench import cpu

    table = cpu.process_table()
    assert os.getpid() in cpu.tree_pids(os.getppid(), table)
    own = table[os.getpid()][1]
    assert (cpu.tree_cpu_seconds(os.getppid(), table) or 0.0) >= own


def test_chaos_smoke(pg_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Five seconds of load under connection kills: answers, effects and the audit hold."""
    out = tmp_path / "chaos.json"
    rc = chaos.main(
        [
            "--seconds",
            "5",
            "--workers",
            "8",
            "--kill-every",
            "1",
            "--database-url",
            pg_server.dsn,
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    report = capsys.readouterr().out
    assert result["kills"] >= 2, report
    assert result["checks"]["audit"]["passed"], report
    assert result["violations"] == [], report
    assert rc == 0 and result["passed"], report


def test_programs_bench_smoke(pg_server: Server, tmp_path: Path) -> None:
    """The grant-program benchmark at 40 employees: a full run, a re-run that
    issues nothing, a department run that funds half, and a clean audit."""
    from bench import programs

    out = tmp_path / "programs.json"
    rc = programs.cli(["--employees", "40", "--database-url", pg_server.dsn, "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["checks"] == {
        "cold_run_issued_all": True,
        "first_run_issued_all": True,
        "second_run_issued_none": True,
        "department_issued_half": True,
        "department_not_below_zero": True,
    }
    assert result["audit"]["passed"], result["audit"]
    assert rc == 0 and result["passed"]


def test_bench_wrk_phases_smoke(pg_server: Server, tmp_path: Path) -> None:
    """The wrk throughput phases run for 2 s each over 40 wallets: every
    answer is the expected 2xx, the wallets fell by what the server debited
    (between the 201s wrk saw and those plus the requests in flight), the
    audit passes, and the debit and read targets take their figures."""
    out = tmp_path / "bench.json"
    rc = harness.main(
        [
            "--only",
            "debit_latency",
            "--requests",
            "5",
            "--wallets",
            "40",
            "--wrk-seconds",
            "2",
            "--pgbench-seconds",
            "1",
            "--pgbench-scale",
            "1",
            "--database-url",
            pg_server.dsn,
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    wrk = result["wrk"]
    assert wrk["available"], wrk
    for kind in ("debit", "read"):
        phase = wrk["phases"][kind]
        assert phase["ok"] > 0 and phase["check"]["passed"], (kind, phase)
        assert phase["service_cpu_ms_per_op"] is not None, phase
    debit = wrk["phases"]["debit"]["check"]
    assert debit["debits_answered_201"] <= debit["debited_by_server"]
    assert result["checks"]["system_usage"]["passed"], result["checks"]["system_usage"]
    assert result["checks"]["audit"]["passed"], result["checks"]["audit"]
    names = [t["target"] for t in result["targets"]]
    assert "wrk debit ops/s / tpcb-like TPS" in names and "wrk read ops/s / tpcb-like TPS" in names
    assert rc == 0 and result["passed"]


async def test_alerts_bench_smoke(database_url: str) -> None:
    """`python -m bench.alerts` at a tiny scale: every set-up runs its debits, one at a
    time and in batches, and no threshold is crossed (so no balance.low)."""
    from bench.alerts import measure

    results = await measure(database_url, 64, 1)
    assert set(results) == {
        (setup, batched)
        for setup in ("no_trigger", "no_alert", "armed", "below")
        for batched in (False, True)
    }
    assert all(v >= 0 for v in results.values())


def test_imports_bench_smoke(pg_server: Server) -> None:
    """The CSV import benchmark at 200 rows: every employee and grant created, the second
    upload all duplicates, the dry run creating nothing, and a clean audit (issue 16)."""
    import argparse
    import asyncio

    from bench import imports

    result = asyncio.run(
        imports.main(argparse.Namespace(rows=200, database_url=pg_server.dsn, json=None))
    )
    steps = {s["step"]: s for s in result["steps"]}
    assert steps["employees dry run"]["created"] == 200
    assert steps["employees"]["created"] == 200 and steps["employees again"]["duplicate"] == 200
    assert steps["grants"]["created"] == 200 and steps["grants again"]["duplicate"] == 200
    assert all(s["rejected"] == 0 for s in result["steps"])
    assert result["audit"] == "clean", result["audit"]


def test_reports_bench_smoke(pg_server: Server) -> None:
    """The report benchmark at 40 employees and 400 events answers every usage and finance
    report without an error (issue 16 added the finance reports and their journal)."""
    import argparse
    import asyncio

    from bench import reports

    args = argparse.Namespace(employees=40, events=400, runs=1, database_url=pg_server.dsn)
    result = asyncio.run(reports.main(args))
    names = [r["group_by"] for r in result["results"]]
    assert [n for n, *_ in reports.FINANCE_REPORTS] == names[-len(reports.FINANCE_REPORTS) :]
    for r in result["results"]:
        for field in ("http_json_seconds", "http_csv_seconds"):
            assert not str(r[field]).startswith("error"), r


def test_spend_rollup_bench_smoke(pg_server: Server) -> None:
    """The roll-up trigger's cost benchmark at 2 rounds of 64 ops: every mode measured with
    and without the trigger, and the roll-ups hold exactly the debits and captures made
    while it was enabled (half the rounds' debits, a quarter of the pairs)."""
    import argparse
    import asyncio

    from bench import spend_rollup

    args = argparse.Namespace(rounds=2, ops=64, database_url=pg_server.dsn, json=None)
    result = asyncio.run(spend_rollup.main(args))
    for mode in spend_rollup.MODES:
        assert len(result[mode]["rounds_with"]) == len(result[mode]["rounds_without"]) == 2
    # Per round with the trigger on: 64 debits, 64 in batches, 16 captures.
    assert result["rolled_up_spends"] == 2 * (64 + 64 + 16)


def test_bench_scale_smoke(pg_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """`make bench-scale` at a tiny size on the session's server: both
    databases build, every figure is measured, the audit passes in full and
    routinely (bench.scale asserts both)."""
    from bench import scale

    argv = ["--employees", "40", "--entries", "6000", "--ops", "10", "--reads", "10"]
    argv += ["--day-ops", "200", "--database-url", pg_server.dsn]
    scale.cli(argv)
    out = capsys.readouterr().out
    table, _, raw = out.partition("\n{")
    result = json.loads("{" + raw)
    for key, _label, _target in scale.ROWS:
        for db in ("fresh", "scale"):
            value = result[db][key]
            # CPU is read from /proc in 10 ms ticks: ten debits can take less
            # than one tick, so 0 is a measurement there; a wall time never is.
            # (As `> 0` for every figure this failed once in a full run of the
            # file, on a figure the short report did not name.)
            assert value >= 0 if key.startswith("cpu_") else value > 0, (db, key, table)
    assert result["scale"]["audit_routine_s"] > 0
    assert result["scale"]["day_transactions"] > 0


def test_bench_audit_scale_smoke(
    pg_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make bench-audit` at two tiny sizes on the session's server: each
    year builds, `audit --full` passes on each twice (bench.audit_scale
    asserts it), timed in wall and CPU seconds in all and per check, and the
    table gives the ratio of the two sizes per entry for every check."""
    from bench import audit_scale
    from service.audit import CHECKS

    out = tmp_path / "audit.json"
    argv = ["--employees", "30", "--sizes", "3000,6000", "--runs", "2"]
    argv += ["--database-url", pg_server.dsn, "--json", str(out)]
    audit_scale.cli(argv)
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert sorted(result["results"]) == ["3000", "6000"]
    for runs in result["results"].values():
        assert len(runs) == 2
        for run in runs:
            assert run["entries"] > 0 and run["total"]["wall"] > 0
            assert run["total"]["server_cpu"] > 0, run["total"]
            assert list(run["checks"]) == list(CHECKS)
    for check in ("**all**", *CHECKS):
        assert f"| {check} |" in table, (check, table)


def test_median_of_rounds_skips_rounds_too_short_to_time() -> None:
    """The median of the interleaved rounds' ratios (plain's time over policy's) leaves
    out a round that took no measurable time (no request in it), and is None when a
    request of either scenario failed (a round's ops are then not its share)."""
    from bench.harness import median_of_rounds

    plain = {"round_seconds": [0.0, 1.0, 2.0, 1.0], "ops": 8, "planned": 8, "capped": False}
    policy = {"round_seconds": [0.0, 2.0, 2.0, 1.0], "ops": 8, "planned": 8, "capped": False}
    assert median_of_rounds(plain, policy) == 1.0  # 0.5, 1.0, 1.0
    assert median_of_rounds(plain, {**policy, "ops": 7}) is None
    assert median_of_rounds(plain, {**policy, "round_seconds": [1.0]}) is None
