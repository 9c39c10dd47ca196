"""Configuration: msgspec Structs read from the environment.

Nothing here runs at import time; `Config.from_env()` is called once by the
entry point and the result is passed into `create_app(config)`, so tests
build apps with whatever config they need.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

# Each field's environment variable is TOKENLEDGER_<FIELD NAME IN CAPS>,
# except database_url, which also answers to the conventional DATABASE_URL.
_PREFIX = "TOKENLEDGER_"

# Former names still read, each for the field it became. The new name wins
# when both are set; serving logs a warning for each former name in use.
DEPRECATED_NAMES = {
    # It switches every background task off, not only the sweeper.
    "TOKENLEDGER_SWEEPER_ENABLED": "background_enabled",
}


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every setting of the service, with its default. The README's
    configuration table lists the same fields."""

    database_url: str | None = None
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8000
    # Worker processes serving the port (README, Performance); 0 means one
    # per core. Each has its own pool (pool_max_size connections) and
    # coalescer.
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    # Pool and driver timeouts, passed to asyncpg explicitly.
    pool_min_size: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 2
    pool_max_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    pool_acquire_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
    connect_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    statement_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] = 5_000
    lock_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] = 2_000
    # Usage reports are read-only and off the hot path: a large grouping may
    # run longer than statement_timeout_ms.
    report_statement_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] = 30_000
    idle_in_transaction_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] = 10_000
    # Whole-transaction retries on serialization failure / deadlock.
    retry_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 5
    # Coalescing (README, Performance): at most this many batched calls of
    # the hot operations run at once per process; requests that arrive while
    # they are all busy go together in the next call, up to coalesce_max_batch
    # of them. One per process, times one process per core, keeps the
    # database busy with batches as large as the traffic makes them (on the
    # 2-core bench box two per process made smaller batches and cost
    # PostgreSQL a third more CPU per debit). Each item is a subtransaction:
    # 64 keeps a batch within PostgreSQL's per-transaction cache of
    # subtransaction ids.
    coalesce_max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    coalesce_max_batch: Annotated[int, msgspec.Meta(ge=1, le=64)] = 32
    # A reservation never lives longer than this from its creation, however
    # often it is extended (README, Reservations).
    reservation_max_lifetime_seconds: Annotated[int, msgspec.Meta(ge=60, le=604_800)] = 86_400
    # A usage event's occurred_at must lie between this long ago and this far
    # ahead of now: a meter may neither pick an old, cheaper price version
    # nor write into months already reported.
    usage_max_age_seconds: Annotated[int, msgspec.Meta(ge=60, le=5 * 366 * 86_400)] = 7 * 86_400
    usage_max_ahead_seconds: Annotated[int, msgspec.Meta(ge=0, le=86_400)] = 300
    # Requests.
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    retry_after_seconds: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 1
    # Background work: the sweeper, the scheduler, the chainer and the rest
    # of service/background.py (TOKENLEDGER_SWEEPER_ENABLED before).
    background_enabled: bool = True
    sweeper_interval_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    sweeper_batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    idempotency_retention_days: Annotated[int, msgspec.Meta(ge=30, le=3650)] = 30
    # Usage events that occurred and were recorded more than this many days
    # ago move to usage_events_archive (README, Retention); 0 keeps them all
    # in usage_events. The roll-ups keep every event, so reports over whole
    # days and months stay exact. At least 31: past
    # usage_max_age_seconds a retried event is refused, never charged again.
    usage_archive_after_days: Annotated[int, msgspec.Meta(ge=0, le=3650)] = 0
    # The hash chain (README, Tamper evidence): transactions are chained once
    # they are this old, which must exceed statement_timeout so that every
    # transaction created before the cutoff has committed.
    chain_settle_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    chain_batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    # Grant-program runs issue this many members per database transaction,
    # so a member's wallet is locked for one batch, not the whole run.
    program_run_batch_size: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    # Schema: migrate at start-up (tokenledger migrate; off where a migration
    # job runs it apart).
    apply_schema: bool = True
    # On SIGTERM (or SIGINT, SIGHUP) requests in flight get this long to
    # finish before they are cancelled; then the pool is closed and the
    # process exits 0 (README, Operations). Keep it below the orchestrator's
    # kill deadline (Kubernetes: terminationGracePeriodSeconds, 30 s).
    shutdown_grace_seconds: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    # Behind a pooler in transaction mode (README, "Behind pgbouncer"),
    # "pgbouncer": asyncpg's prepared-statement cache is off (the pooler may
    # run a statement on another server connection than the one that
    # prepared it), only startup parameters pgbouncer knows are sent, and the
    # timeouts must come from the database role (ALTER ROLE ... SET), which
    # start-up checks.
    db_pooler: Literal["none", "pgbouncer"] = "none"
    # A direct connection to PostgreSQL, not through the pooler, for what
    # needs a session of its own: LISTEN for key changes (the key cache) and
    # the start-up migration. Behind pgbouncer without it the key cache is
    # off (every request looks its key up).
    database_direct_url: str | None = None
    # Logs.
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Authentication (README, Security). "production" refuses to start unless
    # employee-token verification is configured.
    environment: Literal["development", "production"] = "production"
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_jwks_file: str | None = None
    jwt_public_key_file: str | None = None
    jwt_hs256_secret: str | None = None
    jwt_roles_claim: str = "tokenledger_roles"
    # The roles an employee token's roles claim may add (comma-separated);
    # any other role it names is ignored. Only employee by default: an
    # identity provider that can be talked into a claim must not mint admins.
    jwt_allowed_roles: str = "employee"
    jwt_leeway_seconds: Annotated[int, msgspec.Meta(ge=0, le=300)] = 30
    # A service key (tlk_...) to ensure exists with the admin role at start-up,
    # so a newcomer's first curl works; `make run` creates one when unset.
    bootstrap_admin_key: str | None = None
    # Requests per second per caller, by role; the bucket holds this many
    # seconds' worth (burst). A role left out is not limited.
    rate_limits: str = "admin=1000,hr=200,finance=200,meter=5000,employee=20"
    rate_limit_burst_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    # How long a replica may trust a service key it verified without asking
    # the database again (README, Security). Revocations reach every replica
    # at once by NOTIFY; this bounds the trust when that channel is silently
    # broken, so a revoked key fails everywhere within it. 0 turns caching off.
    key_cache_ttl_seconds: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    # Failed authentications per client address (per replica): past this
    # rate, with a bucket of auth_failure_burst, the address gets 429 instead
    # of more look-ups; a caller that authenticated lately is never limited.
    auth_failures_per_second: Annotated[float, msgspec.Meta(gt=0, le=100_000)] = 20.0
    auth_failure_burst: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 100
    # Run every connection as this role (SET ROLE), e.g. tokenledger_app, which
    # may insert into the journal but never update or delete it.
    db_role: str | None = None
    # Where `make run` keeps the embedded PostgreSQL when DATABASE_URL is unset.
    data_dir: str = ".data"
    # Credits per US dollar, for `tokenledger prices import` (README, Prices):
    # the default makes one credit a micro-dollar.
    credits_per_usd: Annotated[int, msgspec.Meta(ge=1, le=10**12)] = 1_000_000
    # Alerts and webhooks (README, Alerts and webhooks). The key that
    # encrypts webhook signing secrets at rest (AES-256-GCM): 32 bytes in
    # base64. Without it, POST /v1/webhooks answers 503 and no dispatcher runs.
    webhook_secret_key: str | None = None
    # Lifts both URL rules: allows http, and loopback, private and link-local
    # addresses (tests, development).
    webhook_allow_private: bool = False
    webhook_dispatcher_enabled: bool = True
    # How often an idle dispatcher looks for new events and due deliveries.
    webhook_poll_interval_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    # One attempt's bound, connect to answer; a claim is leased for this
    # plus a margin, after which another replica may try again.
    webhook_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 10.0
    # Sends in flight per replica, and per webhook across all replicas.
    webhook_max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 32
    webhook_max_in_flight_per_endpoint: Annotated[int, msgspec.Meta(ge=1, le=100)] = 4
    # Retries: base * 2^(attempt-1), at most max, times a random 0.5..1,
    # until retry_for after the delivery was made (at least 24 hours).
    webhook_retry_base_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    webhook_retry_max_seconds: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 3600.0
    webhook_retry_for_seconds: Annotated[int, msgspec.Meta(ge=86_400, le=30 * 86_400)] = 86_400
    # Web pages (README, Web pages). Origins of pages hosted elsewhere that may
    # call the API from a browser (CORS), comma-separated `scheme://host[:port]`;
    # empty, the default, allows none.
    cors_origins: str = ""
    # A request header the company's SSO proxy (oauth2-proxy style) sets to the
    # signed-in employee's JWT, e.g. X-Forwarded-Access-Token; unset, only
    # `Authorization: Bearer` authenticates. The proxy must strip it from what
    # clients send. It authenticates reads only (GET, HEAD): a header the
    # browser's requests carry without the page asking is what CSRF abuses.
    pages_token_header: str | None = None
    # Four eyes (README, Approvals): a grant, a batch holding a grant, or a
    # manual program run granting more than this many credits to one
    # employee waits for a second hr or admin caller. Unset: no approvals.
    approval_threshold: Annotated[int, msgspec.Meta(ge=1, le=2**53)] | None = None
    # The money value of one credit for the compensation report: a currency
    # code and a decimal amount, e.g. "USD 0.000001" (the default matches
    # credits_per_usd). Parsed as a decimal, never a float.
    credit_value: Annotated[
        str, msgspec.Meta(pattern=r"^[A-Z]{3} [0-9]{1,12}(\.[0-9]{1,12})?$")
    ] = "USD 0.000001"
    # Rows of one CSV import (README, Bulk import).
    import_max_rows: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 100_000
    # Report tag keys (README, Reports, "Tag roll-ups"): a comma list of at
    # most 8 tag names whose roll-ups are kept, so that usage reports by
    # `tag:<name>` read them rather than the events and the journal. Empty,
    # the default: none, and the write paths write nothing more. A change is
    # applied at start-up, which rebuilds the tag roll-ups (writes wait).
    report_tags: str = ""

    def __post_init__(self) -> None:
        if self.db_pooler == "pgbouncer" and self.db_role:
            raise ValueError(
                "TOKENLEDGER_DB_ROLE cannot be set through pgbouncer (no SET ROLE at connect): "
                "connect as a login role that is a member of it, with its defaults"
            )
        if self.usage_archive_after_days and (
            self.usage_archive_after_days < 31
            or self.usage_archive_after_days * 86_400 <= self.usage_max_age_seconds
        ):
            raise ValueError(
                "usage_archive_after_days must be 0 (off), or at least 31 and longer than "
                f"usage_max_age_seconds ({self.usage_archive_after_days} days, "
                f"{self.usage_max_age_seconds}s)"
            )
        self.report_tag_names()  # fails on a bad list
        if self.chain_settle_seconds * 1000 <= self.statement_timeout_ms:
            raise ValueError(
                "chain_settle_seconds must exceed statement_timeout_ms "
                f"({self.chain_settle_seconds}s <= {self.statement_timeout_ms}ms)"
            )

    def report_tag_names(self) -> tuple[str, ...]:
        """report_tags as names: each 1 to 64 characters without surrounding
        spaces (a `tag:<name>` key's name), none twice, at most 8 (the roll-ups
        keep each one's value in a slot of an array of 8: schema.sql,
        tl_report_tag_values)."""
        if not self.report_tags.strip():
            return ()
        names = tuple(part.strip() for part in self.report_tags.split(","))
        if not all(1 <= len(n) <= 64 for n in names):
            raise ValueError(
                f"report_tags: a tag name is 1 to 64 characters ({self.report_tags!r})"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"report_tags: a tag name appears twice ({self.report_tags!r})")
        if len(names) > 8:
            raise ValueError(f"report_tags: at most 8 tag names ({self.report_tags!r})")
        return names

    def statement_cache_size(self) -> int:
        """asyncpg's prepared-statement cache: 0 behind pgbouncer, whose
        transaction pooling cannot keep a prepared statement (1.21 and later
        can, with max_prepared_statements; Debian 12 ships 1.18)."""
        return 0 if self.db_pooler == "pgbouncer" else 100

    def session_url(self) -> str | None:
        """Where a session of its own goes (LISTEN, migrations): the direct
        URL, else the database URL unless that is a transaction pooler."""
        if self.database_direct_url:
            return self.database_direct_url
        return None if self.db_pooler == "pgbouncer" else self.database_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read the settings from the environment; bad values fail loudly."""
        env = os.environ if environ is None else environ
        raw: dict[str, object] = {}
        for old, name in DEPRECATED_NAMES.items():
            if old in env:
                raw[name] = env[old]
        for name in cls.__struct_fields__:
            key = env_var(name)
            if key in env:
                raw[name] = env[key]
        if "database_url" not in raw and env.get("DATABASE_URL"):
            raw["database_url"] = env["DATABASE_URL"]
        # strict=False lets msgspec turn "20" into 20 and "false" into False.
        return msgspec.convert(raw, cls, strict=False)


def env_var(field: str) -> str:
    """The environment variable of a Config field (the CLI passes settings to
    worker processes through them)."""
    return _PREFIX + field.upper()


def deprecated_in(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The former setting names set in `environ`, each with its new name."""
    return [(old, env_var(new)) for old, new in DEPRECATED_NAMES.items() if old in environ]
