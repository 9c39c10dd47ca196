"""`tokenledger serve` (the default): the HTTP service, and on a developer's
machine (`make run`) the embedded PostgreSQL and development credentials."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from service.cli.ledger import migrate_database
from service.config import Config, deprecated_in, env_var


def _kept_secret(config: Config, name: str, new: Callable[[], str]) -> str:
    """A development secret kept in the data dir across restarts (readable by
    its owner only), made by `new` the first time."""
    path = Path(config.data_dir) / name
    if path.exists():
        return path.read_text().strip()
    secret = new()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret


def _dev_admin_key(config: Config) -> Config:
    """`make run` on a developer machine: make sure there is an admin key and
    print it, so the first curl works. Kept in the data dir across restarts."""
    from service.auth import new_key

    key = config.bootstrap_admin_key or _kept_secret(config, "admin-key", lambda: new_key().secret)
    print(f"development admin key: {key}", flush=True)
    print(f"  curl -H 'Authorization: Bearer {key}' ...", flush=True)
    return _replace(config, bootstrap_admin_key=key)


def _dev_employee_tokens(config: Config) -> Config:
    """`make run`: when no employee-token verification is configured, verify
    HS256 tokens with a secret kept in the data dir, so that the development
    sign-in (/dev/sign-in, README, Web pages) can mint tokens the API accepts,
    for employees and the finance and hr roles. Development only."""
    import secrets

    assert config.environment == "development"
    if config.jwt_issuer or config.jwt_audience or config.jwt_hs256_secret:
        return config
    if config.jwt_jwks_file or config.jwt_public_key_file:
        return config
    secret = _kept_secret(config, "dev-jwt-secret", lambda: secrets.token_urlsafe(32))
    return _replace(
        config,
        jwt_issuer="tokenledger-dev",
        jwt_audience="tokenledger",
        jwt_hs256_secret=secret,
        jwt_allowed_roles="employee,finance,hr",
    )


def warn_deprecated(environ: Mapping[str, str]) -> None:
    """A warning at start for each former setting name still in use."""
    import structlog

    for old, new in deprecated_in(environ):
        structlog.get_logger("tokenledger.config").warning(
            "deprecated_setting", setting=old, use=new
        )


def serve(config: Config) -> int:
    """Serve until SIGINT, SIGTERM or SIGHUP, then stop gracefully and exit 0
    (service/serving.py); the embedded PostgreSQL, if this started one, is
    stopped last, whichever way serving ended."""
    import uvicorn

    from service import serving
    from service.app import create_app
    from service.observability import configure_logging

    configure_logging(config.log_format, config.log_level)
    warn_deprecated(os.environ)
    stop_embedded: Callable[[], None] | None = None
    if not config.database_url:
        from service.devdb import start_embedded

        print(
            "DATABASE_URL is unset: starting the embedded PostgreSQL in",
            config.data_dir,
            flush=True,
        )
        dsn, stop_embedded = start_embedded(Path(config.data_dir) / "pg")
        config = _replace(config, database_url=dsn)
    try:
        if config.environment == "development":
            config = _dev_admin_key(config)
            config = _dev_employee_tokens(config)
        workers = config.workers or os.cpu_count() or 1
        base = f"http://{config.host}:{config.port}"
        print(
            f"tokenledger {base}/v1  docs {base}/schema  openapi {base}/schema/openapi.json"
            f"  ({workers} worker{'s' if workers > 1 else ''})",
            flush=True,
        )
        sign_in = "/dev/sign-in" if config.environment == "development" else "/sign-in"
        print(f"pages {base}/wallet  {base}/finance  sign in {base}{sign_in}", flush=True)
        options: dict[str, Any] = {
            "host": config.host,
            "port": config.port,
            "log_level": "warning",
            "access_log": False,
            "loop": "uvloop",
            # uvicorn's httptools protocol, its writes of one loop turn sent together
            "http": "service.serving:CorkedHttpToolsProtocol",
            # Requests in flight at a stop get this long to finish.
            "timeout_graceful_shutdown": config.shutdown_grace_seconds,
        }
        if workers == 1:
            server_config = uvicorn.Config(create_app(config), **options)
        else:
            # Worker processes build their app from the environment
            # (service.asgi), so what serve() decided goes there; the
            # schema is migrated once, here, not by each worker.
            if config.apply_schema and asyncio.run(
                migrate_database(
                    config.database_direct_url or config.database_url or "", check=False
                )
            ):
                return 2
            os.environ.update(
                {
                    env_var("database_url"): config.database_url or "",
                    env_var("bootstrap_admin_key"): config.bootstrap_admin_key or "",
                    env_var("environment"): config.environment,
                    env_var("apply_schema"): "false",
                }
            )
            # The development employee-token settings, when serve() chose them.
            os.environ.update(
                {
                    env_var(name): str(getattr(config, name))
                    for name in (
                        "jwt_issuer",
                        "jwt_audience",
                        "jwt_hs256_secret",
                        "jwt_allowed_roles",
                    )
                    if getattr(config, name)
                }
            )
            server_config = uvicorn.Config(
                "service.asgi:app_from_env", factory=True, workers=workers, **options
            )
        started = serving.run(server_config)
    finally:
        if stop_embedded is not None:
            # Before anything is printed: after a closed terminal (SIGHUP)
            # writing to it fails.
            stop_embedded()
            _say("stopped the embedded PostgreSQL")
    return 0 if started else 3


def _say(line: str) -> None:
    """Print, unless the terminal is gone."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def _replace(config: Config, **changes: object) -> Config:
    import msgspec

    return msgspec.structs.replace(config, **changes)
