"""The app factory for worker processes: `uvicorn --factory service.asgi:app_from_env`.

`tokenledger serve` with more than one worker (TOKENLEDGER_WORKERS) starts
uvicorn's worker processes on this factory; each builds its app from the
environment, where serve() has put what it decided (the database URL of an
embedded server, the development admin key).
"""

from __future__ import annotations

from litestar import Litestar

from service.app import create_app
from service.config import Config
from service.observability import configure_logging
from service.serving import stop_on_hangup_in_worker


def app_from_env() -> Litestar:
    stop_on_hangup_in_worker()
    config = Config.from_env()
    configure_logging(config.log_format, config.log_level)
    return create_app(config)
