"""Who may do what: the one table the guard, the README and the OpenAPI schema are made from.

Every `/v1` route names a permission of `PERMISSIONS` (`opt=access("reports.read")`); the
roles allowed are looked up here and nowhere else. The README's role table
(`python -m service.roles` prints it) and each operation's `x-roles` in the served schema are
generated from the same rows, and a test fails when the README drifts from them.

Where this differs from the first published contract, on purpose:

* `hr` reads usage reports. HR runs the allotment programs and the finance page is for the
  finance and hr roles; a report is a read of data HR already sees account by account.
* `finance` funds departments: a transfer from `system:issuance` to a department account
  (`departments.fund`). Budgets are finance's; every other transfer stays with `hr`.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES: tuple[str, ...] = ("admin", "hr", "finance", "meter", "employee")
KEY_ROLES: tuple[str, ...] = ("admin", "hr", "finance", "meter")


@dataclass(frozen=True, slots=True)
class Permission:
    """`roles` may use it on any account (admin always may); with `own`, an employee may use it
    on their own wallet, and anyone else's answers 404. `what` is the README's wording."""

    roles: tuple[str, ...]
    what: str
    own: bool = False


PERMISSIONS: dict[str, Permission] = {
    "me": Permission((), "`GET /v1/me`", own=True),
    "balance.read": Permission(("hr", "finance", "meter"), "read an account and its balance", True),
    "history.read": Permission(
        ("hr", "finance"), "read an account's entries, series, lots and spend", True
    ),
    "reservations.read": Permission(("hr", "finance", "meter"), "read reservations", own=True),
    "directory.read": Permission(("hr", "finance"), "read departments and employees"),
    "directory.write": Permission(
        ("hr",), "create, change and import employees and departments, offboard"
    ),
    "grants.write": Permission(("hr",), "grant credits (single, batch and CSV import), void lots"),
    "programs.read": Permission(("hr", "finance"), "read grant programs and their runs"),
    "programs.write": Permission(("hr",), "create and change grant programs, run a cycle"),
    "transfers": Permission(("hr",), "transfer credits between any accounts"),
    "departments.fund": Permission(
        ("finance",), "fund departments (transfers from `system:issuance` to a department)"
    ),
    "transactions.read": Permission(("hr", "finance"), "read transactions"),
    "reversals": Permission(("finance",), "reverse transactions"),
    "prices.read": Permission(("hr", "finance", "meter"), "read prices"),
    "prices.write": Permission(("finance",), "add prices"),
    "policy.read": Permission(("hr", "finance"), "read spend policies and their windows", True),
    "policy.write": Permission(("hr", "finance"), "set spend policies"),
    "forecast.read": Permission(("hr", "finance"), "read forecasts", own=True),
    "alerts.read": Permission(("hr", "finance"), "read alert settings", own=True),
    "alerts.write": Permission(("hr",), "set alert settings", own=True),
    "webhooks": Permission((), "manage webhook subscriptions and their deliveries"),
    "reports.read": Permission(
        ("hr", "finance"), "read usage, liability, compensation, forecast and efficiency reports"
    ),
    # Four eyes (issue 16): a second hr or admin caller decides a grant above the threshold.
    "approvals": Permission(("hr",), "list, approve and reject approvals (never one's own)"),
    "spend": Permission(
        ("meter",), "reserve, capture, release and extend; debit; record usage events"
    ),
}


def roles_for(*permissions: str) -> frozenset[str]:
    """The roles any of `permissions` admits on any account, admin included."""
    unknown = set(permissions) - set(PERMISSIONS)
    assert not unknown, f"unknown permissions {sorted(unknown)}"
    roles = {"admin"}
    for name in permissions:
        roles.update(PERMISSIONS[name].roles)
    return frozenset(roles)


def own_allowed(*permissions: str) -> bool:
    """Whether an employee may use any of `permissions` on their own wallet."""
    return any(PERMISSIONS[name].own for name in permissions)


def grants(roles: frozenset[str], permission: str) -> bool:
    """Whether `roles` hold `permission` on any account (not just their own)."""
    return bool(roles & roles_for(permission))


def markdown() -> str:
    """The README's role table, one row per role, in `ROLES` order."""
    lines = ["| role | may |", "|---|---|", "| `admin` | everything |"]
    for role in ROLES[1:]:
        if role == "employee":
            mine = [p.what for p in PERMISSIONS.values() if p.own]
            may = "on their own wallet only: " + "; ".join(mine) + " (anyone else's answers 404)"
        else:
            may = "; ".join(p.what for p in PERMISSIONS.values() if role in p.roles)
        lines.append(f"| `{role}` | {may} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
