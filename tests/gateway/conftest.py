"""Gateway fixtures: a real tokenledger process and a real LiteLLM proxy.

`ledger` is `python -m service` (bench.process.Service) on a database cloned
for this module, with a meter key for the gateway and the admin key for
setting up wallets and prices. `proxy` is `litellm --config
deploy/litellm/config.yaml` exactly as the README tells a gateway team to run
it, pointed at `ledger`. Both are started once per module: the proxy takes a
few seconds to import. Everything listens on 127.0.0.1 and nothing reaches a
network: models answer with LiteLLM's `mock_response`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

import bench.process
from bench.process import Service
from tests.pg import Server, cloned_database, run_sync

# LiteLLM fetches its model price map from the network at import unless told
# to use the copy inside the package; tests reach no network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "litellm" / "config.yaml"
PROXY_READY_SECONDS = 120.0

# The price model of the example config's `chat-default`, in credits per
# million tokens: 1 credit per input token, 0.25 per cached input token and 4
# per output token, so costs are easy to check by hand.
PRICE_MODEL = "gpt-4o-mini"
PRICE = {
    "input_per_mtok": 1_000_000,
    "cached_input_per_mtok": 250_000,
    "output_per_mtok": 4_000_000,
}
GATEWAY_MODEL = "chat-default"


def cost_of(input_tokens: int, output_tokens: int, cached: int = 0) -> int:
    """The service's cost formula (README, Prices), for PRICE."""
    total = (
        (input_tokens - cached) * PRICE["input_per_mtok"]
        + cached * PRICE["cached_input_per_mtok"]
        + output_tokens * PRICE["output_per_mtok"]
    )
    return -(-total // 1_000_000)


_ids = itertools.count()


@dataclass
class Ledger:
    """A running tokenledger: its URL, keys, database, and admin helpers."""

    service: Service
    dsn: str
    meter_key: str

    @property
    def url(self) -> str:
        return self.service.base_url

    @property
    def admin_key(self) -> str:
        return self.service.admin_key

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=30,
            trust_env=False,
        )

    def employee(self, credits: int, prefix: str = "gw") -> str:
        """A new employee of department `gw` whose wallet holds `credits`."""
        emp = f"{prefix}-{next(_ids)}-{secrets.token_hex(3)}"
        with self.admin() as c:
            r = c.put(f"/v1/employees/{emp}", json={"name": emp, "email": f"{emp}@example.com",
                                                     "department": "gw"})  # fmt: skip
            assert r.status_code in (200, 201), r.text
            if credits:
                r = c.post(
                    "/v1/grants",
                    json={"employee": emp, "amount": credits, "reason": "spot_bonus"},
                    headers={"Idempotency-Key": f"grant-{emp}"},
                )
                assert r.status_code == 201, r.text
        return emp

    def account(self, address: str) -> dict[str, Any]:
        with self.admin() as c:
            r = c.get(f"/v1/accounts/{address}")
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]

    def reservations(self, address: str, status: str | None = None) -> list[dict[str, Any]]:
        with self.admin() as c:
            params = {"limit": 500, **({"status": status} if status else {})}
            r = c.get(f"/v1/accounts/{address}/reservations", params=params)
            assert r.status_code == 200, r.text
            return r.json()["items"]  # type: ignore[no-any-return]

    def get(self, path: str) -> dict[str, Any]:
        with self.admin() as c:
            r = c.get(path)
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]


def _setup_directory_and_prices(url: str, admin_key: str) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_key}"},
                      timeout=30, trust_env=False) as c:  # fmt: skip
        r = c.put("/v1/departments/gw", json={"name": "Gateway tests"})
        assert r.status_code in (200, 201), r.text
        r = c.post(
            "/v1/prices",
            json={"model": PRICE_MODEL, "effective_from": "2020-01-01T00:00:00Z", **PRICE},
            headers={"Idempotency-Key": "price-gpt-4o-mini"},
        )
        assert r.status_code in (200, 201), r.text


def create_meter_key(dsn: str) -> str:
    """A service key with the meter role, made as an operator would (CLI)."""
    env = {**os.environ, "DATABASE_URL": dsn, "TOKENLEDGER_DATABASE_URL": dsn}
    out = subprocess.run(  # noqa: S603  # why: our own interpreter and module
        [sys.executable, "-m", "service", "keys", "create", "--name", "gateway-test",
         "--role", "meter"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def start_ledger(dsn: str, log_path: Path, port: int | None = None) -> Service:
    """`python -m service` on `dsn`, one worker, ready; on `port` when given
    (a restart keeps its address)."""
    service = Service(dsn, log_path, pool_max_size=10, extra_env={"TOKENLEDGER_WORKERS": "1"})
    if port is not None:
        with mock.patch.object(bench.process, "free_port", lambda: port):
            service.start()
    else:
        service.start()
    try:
        run_sync(service.wait_ready())
    except BaseException:
        service.stop()
        raise
    return service


def restart_ledger(service: Service) -> Service:
    """Start a stopped service again, same database, port and admin key."""
    again = Service(service.dsn, service.log_path.with_suffix(".2.log"), pool_max_size=10,
                    extra_env={"TOKENLEDGER_WORKERS": "1"})  # fmt: skip
    again.admin_key = service.admin_key
    with mock.patch.object(bench.process, "free_port", lambda: service.port):
        again.start()
    run_sync(again.wait_ready())
    return again


@pytest.fixture(scope="module")
def ledger(
    pg_server: Server, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ledger]:
    with cloned_database(pg_server, template_database) as dsn:
        service = start_ledger(dsn, tmp_path_factory.mktemp("ledger") / "service.log")
        try:
            _setup_directory_and_prices(service.base_url, service.admin_key)
            yield Ledger(service, dsn, create_meter_key(dsn))
        finally:
            service.stop()


@dataclass
class Proxy:
    url: str
    master_key: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.master_key}"},
            timeout=60,
            trust_env=False,
            **kw,
        )

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def proxy_env(ledger: Ledger, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "TOKENLEDGER_URL": ledger.url,
        "TOKENLEDGER_API_KEY": ledger.meter_key,
        "LITELLM_MASTER_KEY": "sk-" + secrets.token_hex(24),
        # The model price map ships inside the package; do not fetch it.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "NO_PROXY": "*",
        **extra,
    }


@pytest.fixture(scope="module")
def proxy(ledger: Ledger, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """`litellm --config deploy/litellm/config.yaml` as the README runs it."""
    litellm_bin = shutil.which("litellm", path=str(Path(sys.executable).parent))
    assert litellm_bin, "the litellm CLI is not installed (make venv)"
    port = bench.process.free_port()
    env = proxy_env(ledger)
    log_path = tmp_path_factory.mktemp("proxy") / "litellm.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(  # noqa: S603  # why: the installed litellm CLI
            [litellm_bin, "--config", str(CONFIG), "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    p = Proxy(f"http://127.0.0.1:{port}", env["LITELLM_MASTER_KEY"], proc, log_path)
    try:
        deadline = time.monotonic() + PROXY_READY_SECONDS
        while True:
            assert proc.poll() is None, f"litellm exited {proc.returncode}:\n{p.log_tail()}"
            try:
                if httpx.get(f"{p.url}/health/liveliness", timeout=2, trust_env=False).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"litellm not ready:\n{p.log_tail()}"
            time.sleep(0.3)
        yield p
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def wait_until(predicate: Any, within: float = 10.0) -> None:
    """Poll `predicate()` (sync) until true; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)
