"""service/cli: what the audit command says it checked comes from the checks it ran."""

from __future__ import annotations

from service.audit import CHECKS
from service.cli.ledger import invariants_checked


def test_audit_names_the_invariants_of_the_checks_it_ran() -> None:
    """Every check of the audit counts: today's run covers invariants 1 to 9, not 1 to 8."""
    numbers = sorted({int(check.split("_")[1]) for check in CHECKS})
    assert invariants_checked(CHECKS) == f"invariants {numbers[0]} to {numbers[-1]}"
    assert invariants_checked(CHECKS) == "invariants 1 to 9"


def test_audit_names_gaps_and_single_invariants() -> None:
    """Checks of some invariants only are named one by one; one invariant is singular."""
    assert invariants_checked(["audit_1_unbalanced", "audit_3_x", "audit_4_y", "audit_4_z"]) == (
        "invariants 1, 3 and 4"
    )
    assert invariants_checked(["audit_7_triggers", "audit_7_reversals"]) == "invariant 7"
    assert invariants_checked([]) == "no invariants"
