"""Who is calling: the principal that authentication yields and every
operation is checked against and recorded with."""

from __future__ import annotations

from dataclasses import dataclass

from service import errors


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `id` scopes idempotency keys and is recorded
    as the actor of every transaction it writes."""

    id: str
    roles: frozenset[str]
    employee: str | None = None
    name: str | None = None
    # A service key's scopes (None: unrestricted): the usage sources it may send and the
    # account types it may charge.
    sources: frozenset[str] | None = None
    account_types: frozenset[str] | None = None
    # The departments whose accounts it may charge, and its spend rate cap (credits per
    # minute). Both are checked in the operation's own database call (schema.sql, "Key
    # scopes by department"): an employee's department is only known there, and the cap
    # must count what all of the key's concurrent calls spend.
    departments: tuple[str, ...] | None = None
    rate_limit: int | None = None

    def check_scope(self, account: str, source: str | None = None) -> None:
        """Refuses (403 `forbidden`) a charge outside the key's scopes, before anything is
        read or held: the scope is in the key, the account type in the address."""
        kind = account.partition(":")[0]
        if self.account_types is not None and kind not in self.account_types:
            raise errors.Forbidden(f"this key may not charge {kind} accounts", account=account)
        if source is not None and self.sources is not None and source not in self.sources:
            raise errors.Forbidden(f"this key may not record usage from {source!r}", source=source)
