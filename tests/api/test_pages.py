"""Web pages over HTTP (issue 15): what the server answers. What a browser
makes of it is tests/pages/ (Playwright and Chromium)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.config import Config
from service.pages import CONTENT_SECURITY_POLICY, parse_origins
from tests.api.conftest import Api, key, problem, running
from tests.api.test_auth import employee_token
from tests.api.test_usage import add_price, batch, event, recorded, reserve_estimate

PAGES = ("/wallet", "/finance", "/sign-in", "/schema")


@pytest.mark.parametrize("path", PAGES)
async def test_pages_carry_a_strict_policy(client: Any, path: str) -> None:
    """Every page answers 200 HTML without a token, with a CSP that allows
    only this origin and no inline script, and may not be framed."""
    r = await client.get(path, headers={"Authorization": ""})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp
    assert r.headers.get_list("content-security-policy") == [csp]
    assert "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    # No inline script: every <script> names a file of this service.
    html = r.text
    for chunk in html.split("<script")[1:]:
        head, _, rest = chunk.partition(">")
        assert 'src="/static/' in head, head
        assert rest.startswith("</script>"), rest[:80]
    assert "http://" not in html and "https://" not in html


async def test_the_wallet_starts_its_calls_from_its_first_script(client: Any) -> None:
    """The wallet's first script, ahead of the stylesheet and the modules, is the
    small classic one that starts the first render's calls (wallet-calls.js), a file
    of this service like every other script."""
    head = (await client.get("/wallet")).content.partition(b"</head>")[0]
    first = head.index(b"<script")
    assert head[first:].startswith(b'<script src="/static/js/wallet-calls.js"></script>')
    assert first < head.index(b'rel="stylesheet"') < head.index(b'type="module"')


async def test_docs_assets_are_served_by_the_service(client: Any) -> None:
    """/schema loads Swagger UI from /static/swagger-ui/ (the pinned package), not a CDN."""
    html = (await client.get("/schema")).text
    assert '<script src="/static/swagger-ui/swagger-ui-bundle.js">' in html
    for path in (
        "/static/swagger-ui/swagger-ui-bundle.js",
        "/static/swagger-ui/swagger-ui.css",
        "/static/js/docs.js",
        "/static/js/wallet.js",
        "/static/css/app.css",
    ):
        r = await client.get(path, headers={"Authorization": ""})
        assert r.status_code == 200, path
        assert r.headers["x-content-type-options"] == "nosniff"
    assert (await client.get("/static/../pages.py")).status_code == 404


async def test_static_files_revalidate_with_their_etag(client: Any) -> None:
    """The pages' files are cached five minutes and then revalidated: the same
    ETag answers 304 without a body; an unknown file is 404."""
    r = await client.get("/static/js/wallet-calls.js", headers={"Authorization": ""})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.headers["cache-control"] == "max-age=300"
    assert b"tokenledgerWallet" in r.content
    etag = r.headers["etag"]
    again = await client.get(
        "/static/js/wallet-calls.js", headers={"Authorization": "", "If-None-Match": etag}
    )
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    other = await client.get("/static/js/common.js", headers={"If-None-Match": etag})
    assert other.status_code == 200 and other.headers["etag"] != etag
    assert (await client.get("/static/js/nothing.js")).status_code == 404
    assert (await client.get("/static/css/app.css")).headers["content-type"].startswith("text/css")


async def test_api_answers_keep_their_headers(client: Any) -> None:
    """The page headers are for browsers: /v1 answers are unchanged."""
    r = await client.get("/v1/accounts/system:issuance")
    assert r.status_code == 200
    assert "content-security-policy" not in r.headers


async def test_cors_is_closed_by_default(client: Any) -> None:
    """Without TOKENLEDGER_CORS_ORIGINS no origin is allowed to read answers."""
    r = await client.get("/v1/accounts/system:issuance", headers={"Origin": "https://pages.test"})
    assert "access-control-allow-origin" not in r.headers
    r = await client.options(
        "/v1/accounts/system:issuance",
        headers={"Origin": "https://pages.test", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in r.headers


async def test_cors_allows_only_the_configured_origins(config: Config, admin_key: str) -> None:
    """With TOKENLEDGER_CORS_ORIGINS a listed origin may call the API (preflight
    included); another may not."""
    app = create_app(msgspec_replace(config, cors_origins="https://pages.test"))
    async with running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver.local"
        ) as c:
            auth = {"Authorization": f"Bearer {admin_key}"}
            r = await c.get(
                "/v1/accounts/system:issuance", headers={**auth, "Origin": "https://pages.test"}
            )
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "https://pages.test"
            pre = await c.options(
                "/v1/accounts/system:issuance",
                headers={
                    "Origin": "https://pages.test",
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert pre.status_code in (200, 204), pre.text
            assert pre.headers["access-control-allow-origin"] == "https://pages.test"
            other = await c.get(
                "/v1/accounts/system:issuance", headers={**auth, "Origin": "https://evil.test"}
            )
            assert "access-control-allow-origin" not in other.headers


def test_cors_origins_must_be_origins() -> None:
    """A wildcard or a path in TOKENLEDGER_CORS_ORIGINS fails at start-up."""
    assert parse_origins(" https://a.test, http://b.test:8080 ") == [
        "https://a.test",
        "http://b.test:8080",
    ]
    for bad in ("*", "https://*.test", "https://a.test/path", "a.test", "ftp://a.test"):
        with pytest.raises(ValueError):
            parse_origins(bad)


def msgspec_replace(config: Config, **changes: Any) -> Config:
    import msgspec

    return msgspec.structs.replace(config, **changes)


async def test_dev_sign_in_does_not_exist_in_production(config: Config) -> None:
    """With TOKENLEDGER_ENVIRONMENT=production there is no /dev/sign-in route at all."""
    app = create_app(msgspec_replace(config, environment="production"))
    async with running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver.local"
        ) as c:
            assert (await c.get("/dev/sign-in")).status_code == 404
            r = await c.post("/dev/sign-in", json={"employee": "e-1"})
            assert r.status_code in (404, 405)
            assert (await c.get("/wallet")).status_code == 200


async def test_dev_sign_in_needs_its_csrf_token(client: Any, api: Api) -> None:
    """The development sign-in's POST is refused without the CSRF cookie and
    header, and with them mints a token the API accepts for that employee."""
    await api.employee("e-1")
    c = client
    refused = await c.post("/dev/sign-in", json={"employee": "e-1"})
    problem(refused, 403, "forbidden")
    page = await c.get("/dev/sign-in")
    assert page.status_code == 200
    csrf = page.cookies["tl_csrf"]
    wrong = await c.post(
        "/dev/sign-in", json={"employee": "e-1"}, headers={"X-CSRF-Token": csrf[:-2] + "xx"}
    )
    problem(wrong, 403, "forbidden")
    r = await c.post("/dev/sign-in", json={"employee": "e-1"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    me = await c.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["address"] == "employee:e-1"
    missing = await c.post(
        "/dev/sign-in", json={"employee": "nobody"}, headers={"X-CSRF-Token": csrf}
    )
    problem(missing, 404, "employee_not_found")
    finance = await c.post(
        "/dev/sign-in", json={"employee": "e-1", "role": "finance"}, headers={"X-CSRF-Token": csrf}
    )
    # The test config lets employee tokens carry hr only, not finance.
    problem(finance, 400, "invalid_request")


async def test_proxy_header_authenticates_reads_only(config: Config, api: Api) -> None:
    """TOKENLEDGER_PAGES_TOKEN_HEADER carries an employee JWT for GET; a POST
    with only that header is unauthenticated (the browser would send it for
    any site), and a service key is never taken from it."""
    await api.employee("e-1")
    header = "X-Forwarded-Access-Token"
    app = create_app(msgspec_replace(config, pages_token_header=header))
    async with running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver.local"
        ) as c:
            h = {"X-Forwarded-Access-Token": employee_token("e-1")}
            me = await c.get("/v1/me", headers=h)
            assert me.status_code == 200, me.text
            assert me.json()["address"] == "employee:e-1"
            post = await c.post(
                "/v1/debits",
                json={"account": "employee:e-1", "amount": 1},
                headers={**h, "Idempotency-Key": "k-proxy"},
            )
            problem(post, 401, "unauthenticated")
    plain = await api.c.get("/v1/me", headers={"Authorization": "", **h})
    problem(plain, 401, "unauthenticated")


async def test_spend_of_a_wallet(client: Any, api: Api) -> None:
    """GET /v1/accounts/{a}/spend sums debits and usage per day and usage per
    model and project; an employee reads their own and nobody else's."""
    await api.employee("e-1")
    await api.employee("e-2")
    await api.grant("e-1", 100_000)
    await api.grant("e-2", 100_000)
    now = datetime.now(UTC)
    await add_price(client, now - timedelta(days=1))
    r = await api.debit("employee:e-1", 700, metadata={"model": "x"})
    assert r.status_code == 201, r.text
    used = await recorded(client, event("s-1", account="employee:e-1", project="alpha"))
    await recorded(client, event("s-2", account="employee:e-2"))
    frm = (now - timedelta(days=1)).isoformat()
    to = (now + timedelta(days=1)).isoformat()
    own = {"Authorization": f"Bearer {employee_token('e-1')}"}
    r = await client.get(
        "/v1/accounts/employee:e-1/spend", params={"from": frm, "to": to}, headers=own
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["credits"] == 700 + used["cost"]
    assert [d["credits"] for d in body["days"]] == [700 + used["cost"]]
    assert body["days"][0]["day"] == now.strftime("%Y-%m-%d")
    assert body["models"] == [
        {"model": "gpt-test", "project": "alpha", "events": 1, "credits": used["cost"]},
        {"model": "x", "project": None, "events": 1, "credits": 700},
    ]
    other = await client.get(
        "/v1/accounts/employee:e-2/spend", params={"from": frm, "to": to}, headers=own
    )
    problem(other, 404, "employee_not_found")
    bad = await client.get("/v1/accounts/employee:e-1/spend", params={"from": to, "to": frm})
    problem(bad, 400, "invalid_request")


async def test_spend_by_model_counts_every_kind_of_spend(client: Any, api: Api) -> None:
    """The spend per model and project counts usage events, debits and captures
    by amount (net of reversals), each under the model and project it names,
    spend without a model under `model: null`, and adds up to the total,
    which is what the journal took from the wallet."""
    await api.employee("e-1")
    await api.grant("e-1", 1_000_000)
    now = datetime.now(UTC)
    await add_price(client, now - timedelta(days=1))
    a = "employee:e-1"
    assert (await api.debit(a, 700, metadata={"model": "x", "project": "p"})).status_code == 201
    assert (await api.debit(a, 300)).status_code == 201
    reversed_debit = await api.debit(a, 5_000, metadata={"model": "x", "project": "p"})
    assert reversed_debit.status_code == 201
    r = await client.post(
        f"/v1/transactions/{reversed_debit.json()['id']}/reverse", json={}, headers=key()
    )
    assert r.status_code == 201, r.text
    used = await recorded(client, event("s-1", account=a, project="alpha"))
    # Two events charged by one batch transaction, under two projects.
    two = await batch(
        client,
        [event("s-2", account=a, project="alpha"), event("s-3", 2000, account=a, project="beta")],
    )
    assert [x["status"] for x in two] == ["recorded", "recorded"]
    # A reservation of an estimate captured by amount: under the estimate's model.
    rsv = await reserve_estimate(
        client, a, model="gpt-test", input_tokens=1000, max_output_tokens=100
    )
    assert rsv.status_code == 201, rsv.text
    cap = await client.post(
        f"/v1/reservations/{rsv.json()['id']}/capture", json={"amount": 111}, headers=key()
    )
    assert cap.status_code == 200, cap.text
    # A reservation by amount, its model in its metadata, captured by amount.
    rsv = await client.post(
        "/v1/reservations",
        json={"account": a, "amount": 500, "metadata": {"model": "y"}},
        headers=key(),
    )
    assert rsv.status_code == 201, rsv.text
    cap = await client.post(
        f"/v1/reservations/{rsv.json()['id']}/capture", json={"amount": 222}, headers=key()
    )
    assert cap.status_code == 200, cap.text
    body = (
        await client.get(
            f"/v1/accounts/{a}/spend",
            params={
                "from": (now - timedelta(days=1)).isoformat(),
                "to": (now + timedelta(days=1)).isoformat(),
            },
        )
    ).json()
    alpha = used["cost"] + two[0]["cost"]
    assert body["models"] == sorted(
        [
            {"model": "gpt-test", "project": "alpha", "events": 2, "credits": alpha},
            {"model": "gpt-test", "project": "beta", "events": 1, "credits": two[1]["cost"]},
            {"model": "gpt-test", "project": None, "events": 1, "credits": 111},
            {"model": "x", "project": "p", "events": 2, "credits": 700},
            {"model": None, "project": None, "events": 1, "credits": 300},
            {"model": "y", "project": None, "events": 1, "credits": 222},
        ],
        key=lambda m: -m["credits"],
    )
    # The ledger's figure: the wallet's debit, usage and capture entries, net
    # of reversals, read back through the journal.
    entries = (await client.get(f"/v1/accounts/{a}/entries", params={"limit": 500})).json()
    spent = -sum(e["amount"] for e in entries["items"] if e["kind"] != "grant")
    assert body["credits"] == spent == sum(m["credits"] for m in body["models"])
    assert spent == 700 + 300 + alpha + two[1]["cost"] + 111 + 222


async def test_database_refusing_connections_is_unavailable(
    client: Any, api: Api, database_url: str, pg_server: Any
) -> None:
    """A database that refuses new connections (here: ALLOW_CONNECTIONS false,
    SQLSTATE 55000) answers 503 unavailable with Retry-After, as a lost one
    does: the wallet page's error state, never a 500."""
    import asyncpg

    await api.employee("e-1")
    name = database_url.rpartition("/")[2]
    admin = await asyncpg.connect(pg_server.dsn_for("postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        # The first request may meet the connection the pool had (terminated),
        # the next ones open new connections, which the database refuses.
        for _ in range(3):
            r = await client.get("/v1/accounts/employee:e-1")
            body = problem(r, 503, "unavailable")
            assert r.headers["retry-after"] == "1", body
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


def test_make_run_configures_development_tokens(tmp_path: Any) -> None:
    """`make run` (development, no JWT settings) verifies HS256 tokens with a
    secret kept in the data dir, so the development sign-in works at once;
    configured JWT settings are left alone."""
    from service.cli.serve import _dev_employee_tokens

    base = Config(environment="development", data_dir=str(tmp_path))
    first = _dev_employee_tokens(base)
    assert first.jwt_issuer and first.jwt_audience and first.jwt_hs256_secret
    assert "finance" in first.jwt_allowed_roles
    assert _dev_employee_tokens(base).jwt_hs256_secret == first.jwt_hs256_secret
    configured = msgspec_replace(base, jwt_issuer="https://idp", jwt_audience="x")
    assert _dev_employee_tokens(configured) == configured
