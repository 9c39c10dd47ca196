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


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every setting of the service, with its default. The README's
    configuration table lists the same fields."""

    database_url: str | None = None
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8000
    # Pool and driver timeouts, passed to asyncpg explicitly.
    pool_min_size: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 2
    pool_max_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    pool_acquire_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
    connect_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    statement_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] = 5_000
    lock_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] = 2_000
    idle_in_transaction_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] = 10_000
    # Whole-transaction retries on serialization failure / deadlock.
    retry_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 5
    # Requests.
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    retry_after_seconds: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 1
    # Background work.
    sweeper_enabled: bool = True
    sweeper_interval_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    sweeper_batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    idempotency_retention_days: Annotated[int, msgspec.Meta(ge=30, le=3650)] = 30
    # Schema: apply schema.sql at start-up (off where migrations are run apart).
    apply_schema: bool = True
    # Logs.
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Where `make run` keeps the embedded PostgreSQL when DATABASE_URL is unset.
    data_dir: str = ".data"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read the settings from the environment; bad values fail loudly."""
        env = os.environ if environ is None else environ
        raw: dict[str, object] = {}
        for name in cls.__struct_fields__:
            key = _PREFIX + name.upper()
            if key in env:
                raw[name] = env[key]
        if "database_url" not in raw and env.get("DATABASE_URL"):
            raw["database_url"] = env["DATABASE_URL"]
        # strict=False lets msgspec turn "20" into 20 and "false" into False.
        return msgspec.convert(raw, cls, strict=False)


def env_var(field: str) -> str:
    return _PREFIX + field.upper()
