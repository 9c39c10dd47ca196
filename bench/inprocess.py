"""The service in this process, for the side benches that time its own work
with no subprocess or network in between: a config for one run, and an httpx
client on its ASGI app."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx

from service.app import create_app
from service.auth import new_key
from service.config import Config


def bench_config(dsn: str, **fields: Any) -> Config:
    """The config of one bench run on `dsn`: the schema already applied, no
    background tasks (the bench times only its own work), quiet logs, a fresh
    admin key, no rate limits; `fields` on top."""
    return Config(
        database_url=dsn,
        apply_schema=False,
        background_enabled=False,
        log_level="warning",
        environment="development",
        bootstrap_admin_key=new_key().secret,
        rate_limits="",
        **fields,
    )


@contextlib.asynccontextmanager
async def client(
    config: Config,
    *,
    timeout_seconds: float,
    pool: asyncpg.Pool | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """The app of `config` (on `pool` when given) through its lifespan, and a
    client of it that presents the admin key."""
    app = create_app(config, pool=pool)
    async with (
        app.lifespan(),
        httpx.AsyncClient(
            # why: Litestar types its ASGI scope more narrowly than httpx's callable does.
            transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
            base_url="http://bench.local",
            headers={"Authorization": f"Bearer {config.bootstrap_admin_key}", **(headers or {})},
            timeout=timeout_seconds,
        ) as http,
    ):
        yield http
