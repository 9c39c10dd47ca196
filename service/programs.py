"""Running a grant-program cycle (README, Grant programs).

A run is a loop of batches, each one SQL call (tl_program_run) and one
database transaction covering up to `program_run_batch_size` members in
employee-id order. Batching keeps row locks short: a member's wallet is
locked while its batch commits, not for the whole run. Exactly-once does
not depend on the loop: every batch claims its (program, cycle, employee)
rows against the primary key, so a run that stops half way, or a second
run at the same time, never issues a grant twice; the run row stays
incomplete (`completed_at` null) and the scheduler runs the cycle again.
"""

from __future__ import annotations

from typing import Any

from service.journal import Context, Database


async def run_cycle(ledger: Database, program: str, cycle: str, trigger: str, ctx: Context) -> Any:
    """Issue `cycle` of `program` batch by batch; returns the completed run."""
    run_id: str | None = None
    after: str | None = None
    while True:
        result = await ledger.fetchval(
            "run_program",
            program,
            cycle,
            trigger,
            ledger.context_json(ctx),
            run_id,
            after,
            ledger.config.program_run_batch_size,
        )
        run = result["run"]
        after = result["next"]
        if after is None:
            ledger.metrics.record_program_run(run)
            return run
        run_id = str(run["id"]).removeprefix("run_")
