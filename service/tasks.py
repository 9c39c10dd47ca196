"""Stopping the background tasks a replica runs (the background loop, the key
listener, the webhook dispatcher): each is cancelled at shutdown the same way,
so the way is written once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended, so that nothing it does
    outlives the caller's shutdown (the pool it uses is closed next). Its
    CancelledError is the expected end and is swallowed; any other error it
    ends with propagates. None (never started) is a no-op."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
